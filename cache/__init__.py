"""The teacher cache: its records and settings (``cache.schema``), writer (``cache.writer``), reader
(``cache.reader``), folder and manifest (``cache.manifest``), ``cache.verify``, the shard backends and shared
low-level helpers (``cache.util``)."""
