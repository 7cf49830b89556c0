"""The one exception type users see: a message for people, printed as one line by the CLI."""


class KdcodeError(Exception):
    """Bad input or a fault the user can fix. The message says what, where, and how to fix it."""

    exit_code = 2


class KdcodeDeprecation(FutureWarning):
    """An old spelling that still works; the CLI prints it as one ``warning:`` line."""
