"""The shard backends by format name: the one place that knows every backend (``cache.writer`` and
``cache.reader`` look a backend up here and never import one themselves)."""

from __future__ import annotations

from cache.arrow_backend import ArrowBackend
from cache.schema import FORMATS, ShardBackend
from cache.zarr_backend import ZarrBackend

BACKENDS: dict[str, ShardBackend] = {"arrow": ArrowBackend(), "zarr": ZarrBackend()}
assert tuple(BACKENDS) == FORMATS


def backend_for(fmt: str) -> ShardBackend:
    """The backend that writes and reads shards of format ``fmt`` (``arrow`` or ``zarr``)."""
    return BACKENDS[fmt]
