"""The teacher cache: on-disk format (``cache.format``) and shared low-level helpers (``cache.util``)."""
