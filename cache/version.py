"""The project version, written into cache manifests and checkpoint provenance (``pipeline.__version__``)."""

__version__ = "0.1.0"
