"""Stage one (data, teacher pass), task evaluation, the demo and the command-line interface."""

from cache.version import __version__

__all__ = ["__version__"]
