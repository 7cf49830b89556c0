"""kdcode: distil code-completion language models into small, fast students."""

__version__ = "0.1.0"
