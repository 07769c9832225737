"""The names ``cache.format`` held in version 0.1.0, kept so that code written against it still imports.

The cache's code now lives in ``cache.writer`` (``CacheWriter``), ``cache.reader`` (``open_cache``,
``CacheReader``), ``cache.verify`` (``verify_cache``), ``cache.manifest`` (the folder's names, journals and
manifest checks) and ``cache.schema`` (records, settings, errors); import from there. Nothing in this
project imports this module (``tests/test_layers.py`` checks that).
"""

from cache.manifest import INDEX, MANIFEST, unit_name
from cache.reader import CacheReader, VerifyMode, open_cache
from cache.schema import (
    FORMAT_VERSION,
    FORMATS,
    CacheError,
    CacheRecord,
    CacheSettings,
    FingerprintMismatch,
    normalize_record,
)
from cache.verify import verify_cache
from cache.writer import TMP_PREFIX, CacheWriter

__all__ = ["FORMAT_VERSION", "FORMATS", "INDEX", "MANIFEST", "TMP_PREFIX", "CacheError", "CacheReader",
           "CacheRecord", "CacheSettings", "CacheWriter", "FingerprintMismatch", "VerifyMode",
           "normalize_record", "open_cache", "unit_name", "verify_cache"]
