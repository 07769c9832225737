"""What a teacher cache holds, independent of how a shard stores it: the record, the settings, the errors,
the format version, and the small interface every shard backend implements (``ShardBackend``).

Layering inside ``cache/``: this module and ``cache.util`` at the bottom; the backends
(``cache.arrow_backend``, ``cache.zarr_backend``) import only these; ``cache.backends`` maps a format name
to its backend; ``cache.manifest`` (folder names, journals, manifest checks) uses only this module and
``cache.util``; ``cache.writer`` and ``cache.reader`` sit on top of it and reach the backends only through
that registry; ``cache.verify`` reads through ``cache.reader``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cache.util import UserError

FORMAT_VERSION = 3  # 2: compact encoding, adaptive k and the manifest's own content hash; 3: compact ids
# through per-record frequency dictionaries, varint stream headers
FORMATS = ("arrow", "zarr")  # shard formats; cache.backends maps each to its backend
ENCODINGS = ("exact", "compact")  # record encodings; compact is cache.codec


class CacheError(UserError):
    """A cache folder that is missing, incomplete, corrupt, locked or made with other settings."""


class FingerprintMismatch(CacheError):
    """The folder holds a (partial) cache made with another fingerprint, settings or format version."""


@dataclass(frozen=True)
class CacheSettings:
    """How the teacher distributions are stored. ``vocab_size`` is the teacher's logits width."""

    topk: int
    vocab_size: int
    samples: int = 0
    temperatures: tuple[float, ...] = (1.0,)
    dtype: str = "float16"
    format: str = "arrow"
    zarr_chunk_rows: int = 4096
    encoding: str = "exact"  # exact: int32 ids, dtype log-probs, float32 shift/tail; compact: cache.codec
    top_p: float | None = None  # compact only: adaptive k (fewest ids reaching this T=1 mass, at most topk)
    lp_step: float = 1.0 / 16  # compact only: log-prob quantisation step in nats

    def __post_init__(self) -> None:
        temps = tuple(float(t) for t in self.temperatures)
        object.__setattr__(self, "temperatures", temps)
        if not isinstance(self.topk, int) or self.topk < 1:
            raise UserError(f"topk must be an integer >= 1, got {self.topk!r}; pass e.g. --topk 64")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise UserError(f"vocab_size must be a positive integer, got {self.vocab_size!r}")
        if self.topk > self.vocab_size:
            raise UserError(f"topk={self.topk} exceeds the teacher vocabulary ({self.vocab_size}); "
                            f"lower --topk")
        if not isinstance(self.samples, int) or self.samples < 0:
            raise UserError(f"samples must be an integer >= 0 (0 disables sampling), got {self.samples!r}")
        if not temps:
            raise UserError("temperatures must not be empty; pass e.g. --temperatures 1,2")
        if any(not math.isfinite(t) or t <= 0 for t in temps):
            raise UserError(f"temperatures must be finite and > 0, got {list(temps)}")
        if len(set(temps)) != len(temps):
            raise UserError(f"temperatures must be unique, got {list(temps)}")
        if self.dtype not in ("float16", "float32"):
            raise UserError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.format not in FORMATS:
            raise UserError(f"format must be arrow or zarr, got {self.format!r}")
        if not isinstance(self.zarr_chunk_rows, int) or self.zarr_chunk_rows < 1:
            raise UserError(f"zarr_chunk_rows must be an integer >= 1, got {self.zarr_chunk_rows!r}")
        if self.encoding not in ENCODINGS:
            raise UserError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.encoding == "compact":  # decoded log-probs are float32 (the stored form is quantised)
            object.__setattr__(self, "dtype", "float32")
        if self.top_p is not None:
            object.__setattr__(self, "top_p", float(self.top_p))
            if self.encoding != "compact":
                raise UserError("top_p (adaptive k) needs the compact encoding; pass --encoding compact")
            if not 0 < self.top_p <= 1:
                raise UserError(f"top_p must be in (0, 1], got {self.top_p}; pass e.g. --top-p 0.95")
        object.__setattr__(self, "lp_step", float(self.lp_step))
        if not (math.isfinite(self.lp_step) and 0 < self.lp_step <= 1):
            raise UserError(f"lp_step must be in (0, 1] nats, got {self.lp_step}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["temperatures"] = list(self.temperatures)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CacheSettings:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["temperatures"] = tuple(kw.get("temperatures", (1.0,)))
        return cls(**kw)


@dataclass
class CacheRecord:
    """One sequence and its teacher rows (alignment: docs/cache-spec.md)."""

    seq_id: int
    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]
    assistant_start: int
    topk_ids: np.ndarray  # int32 [n, k]
    topk_logprobs: np.ndarray  # float16/float32 [n, k]
    topk_shift: np.ndarray  # float32 [n, nT]
    tail_mass: np.ndarray  # float32 [n, nT]
    sample_offsets: np.ndarray | None = None  # int64 [n+1]
    sample_ids: np.ndarray | None = None  # int32 [m]
    sample_counts: np.ndarray | None = None  # int32 [m]

    @property
    def num_supervised(self) -> int:
        return int(self.topk_ids.shape[0])


def _as_record(r: CacheRecord | Mapping[str, Any]) -> CacheRecord:
    return r if isinstance(r, CacheRecord) else CacheRecord(**r)


def normalize_record(r: CacheRecord | Mapping[str, Any], settings: CacheSettings) -> CacheRecord:
    """Cast a record to the stored dtypes and check its shapes against ``settings`` (ValueError if bad)."""
    r = _as_record(r)
    k, nT = settings.topk, len(settings.temperatures)
    ids = np.ascontiguousarray(r.input_ids, dtype=np.int32).reshape(-1)
    mask = np.ascontiguousarray(r.loss_mask, dtype=np.bool_).reshape(-1)
    n = int(mask.sum())
    topk_ids = np.ascontiguousarray(r.topk_ids, dtype=np.int32)
    lp_dtype = np.float32 if settings.encoding == "compact" else np.dtype(settings.dtype)
    lp = np.ascontiguousarray(r.topk_logprobs, dtype=lp_dtype)  # compact: float32 in, quantised by codec
    shift = np.ascontiguousarray(r.topk_shift, dtype=np.float32)
    tail = np.ascontiguousarray(r.tail_mass, dtype=np.float32)
    where = f"record seq_id={r.seq_id}"
    if ids.shape != mask.shape:
        raise ValueError(f"{where}: input_ids has {ids.shape[0]} tokens but loss_mask {mask.shape[0]}")
    for name, a, cols in (("topk_ids", topk_ids, k), ("topk_logprobs", lp, k), ("topk_shift", shift, nT),
                          ("tail_mass", tail, nT)):
        if a.shape != (n, cols):
            raise ValueError(f"{where}: {name} has shape {a.shape}, expected ({n}, {cols})")
    off = cnt = sids = None
    if settings.samples > 0:
        if r.sample_offsets is None or r.sample_ids is None or r.sample_counts is None:
            raise ValueError(f"{where}: samples={settings.samples} but sample_* fields are missing")
        off = np.ascontiguousarray(r.sample_offsets, dtype=np.int64).reshape(-1)
        sids = np.ascontiguousarray(r.sample_ids, dtype=np.int32).reshape(-1)
        cnt = np.ascontiguousarray(r.sample_counts, dtype=np.int32).reshape(-1)
        if off.shape != (n + 1,) or off[0] != 0 or off[-1] != sids.shape[0] or np.any(np.diff(off) < 0):
            raise ValueError(f"{where}: sample_offsets must be non-decreasing [n+1] from 0 to "
                             f"len(sample_ids)")
        if cnt.shape != sids.shape:
            raise ValueError(f"{where}: sample_counts and sample_ids differ in length")
    elif r.sample_offsets is not None or r.sample_ids is not None:
        raise ValueError(f"{where}: sample_* fields given but settings.samples == 0")
    return CacheRecord(int(r.seq_id), ids, mask, int(r.assistant_start), topk_ids, lp, shift, tail,
                       off, sids, cnt)



class ShardReader(Protocol):
    """One opened shard: random access to its records."""

    num_records: int

    def record(self, i: int) -> CacheRecord: ...


class ShardBackend(Protocol):
    """How one unit's records become a shard on disk and back.

    ``write`` creates the shard at ``path`` (a file, or a folder when ``is_dir``); the caller publishes it
    under its final name (fsync and rename) and journals the files it holds. ``open`` returns a reader of a
    published shard; ``meta`` is its manifest entry (``file``, ``files`` with sizes and hashes, ...).
    """

    name: str
    is_dir: bool

    def write(self, path: Path, records: list[CacheRecord], settings: CacheSettings) -> None: ...

    def open(self, base: Path, meta: Mapping[str, Any], settings: CacheSettings) -> ShardReader: ...
