from kdcode.cli import main

main()
