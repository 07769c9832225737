"""Stage one (data, teacher pass) and the command-line interface."""

__version__ = "0.1.0"
