"""Arrow IPC shards (``unit-000000.arrow``): one record batch, one row per sequence, every variable-length
field a ``large_list`` column; read through a memory map, so one record costs O(record)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cache.codec import decode_record, encode_record
from cache.schema import FORMAT_VERSION, CacheRecord, CacheSettings

_ARROW_LIST_FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_shift", "tail_mass")
_ARROW_SAMPLE_FIELDS = ("sample_offsets", "sample_ids", "sample_counts")


def _write_arrow_unit(path: Path, records: list[CacheRecord], settings: CacheSettings) -> None:
    import pyarrow as pa

    def col(arrays: list[np.ndarray], dtype: np.dtype) -> pa.Array:
        sizes = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values.astype(dtype, copy=False)))

    cols: dict[str, pa.Array] = {
        "seq_id": pa.array(np.array([r.seq_id for r in records], dtype=np.int64)),
        "assistant_start": pa.array(np.array([r.assistant_start for r in records], dtype=np.int64)),
    }
    if settings.encoding == "compact":
        blobs = [np.frombuffer(encode_record(r, settings), dtype=np.uint8) for r in records]
        cols["record"] = col(blobs, np.dtype(np.uint8))
    else:
        cols.update(_exact_columns(records, settings, col))
    batch = pa.record_batch(list(cols.values()), names=list(cols))
    meta = {b"fnet_distill_format_version": str(FORMAT_VERSION).encode(),
            b"fnet_distill_encoding": settings.encoding.encode()}
    schema = batch.schema.with_metadata(meta)
    with open(path, "wb") as f:
        with pa.ipc.new_file(f, schema) as w:
            w.write_batch(batch)
        f.flush()
        os.fsync(f.fileno())


def _exact_columns(records: list[CacheRecord], settings: CacheSettings, col: Any) -> dict[str, Any]:
    cols = {
        "input_ids": col([r.input_ids for r in records], np.dtype(np.int32)),
        "loss_mask": col([r.loss_mask.view(np.uint8) for r in records], np.dtype(np.uint8)),
        "topk_ids": col([r.topk_ids for r in records], np.dtype(np.int32)),
        "topk_logprobs": col([r.topk_logprobs for r in records], np.dtype(settings.dtype)),
        "topk_shift": col([r.topk_shift for r in records], np.dtype(np.float32)),
        "tail_mass": col([r.tail_mass for r in records], np.dtype(np.float32)),
    }
    if settings.samples > 0:
        cols["sample_offsets"] = col([r.sample_offsets for r in records], np.dtype(np.int64))
        cols["sample_ids"] = col([r.sample_ids for r in records], np.dtype(np.int32))
        cols["sample_counts"] = col([r.sample_counts for r in records], np.dtype(np.int32))
    return cols


class _ArrowShard:
    """Memory-mapped Arrow shard: per column the (offsets, values) numpy views, so a record is O(record)."""

    def __init__(self, path: Path, settings: CacheSettings):
        import pyarrow as pa

        self._mm = pa.memory_map(str(path), "r")
        batch = pa.ipc.open_file(self._mm).get_batch(0)
        self.k, self.nT = settings.topk, len(settings.temperatures)
        self.settings = settings
        self.compact = settings.encoding == "compact"
        self.seq_id = batch.column("seq_id").to_numpy()
        self.assistant_start = batch.column("assistant_start").to_numpy()
        self.num_records = batch.num_rows
        names = _ARROW_LIST_FIELDS + (_ARROW_SAMPLE_FIELDS if settings.samples > 0 else ())
        if self.compact:
            names = ("record",)
        self.cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in names:
            arr = batch.column(name)
            self.cols[name] = (arr.offsets.to_numpy(), arr.values.to_numpy(zero_copy_only=True))
        self._batch = batch

    def _get(self, name: str, i: int) -> np.ndarray:
        off, values = self.cols[name]
        return values[off[i]:off[i + 1]]

    def record(self, i: int) -> CacheRecord:
        if self.compact:
            return decode_record(int(self.seq_id[i]), int(self.assistant_start[i]), self._get("record", i),
                                 self.settings)
        g = self._get
        has_samples = "sample_ids" in self.cols
        return CacheRecord(
            seq_id=int(self.seq_id[i]),
            input_ids=g("input_ids", i),
            loss_mask=g("loss_mask", i).view(np.bool_),
            assistant_start=int(self.assistant_start[i]),
            topk_ids=g("topk_ids", i).reshape(-1, self.k),
            topk_logprobs=g("topk_logprobs", i).reshape(-1, self.k),
            topk_shift=g("topk_shift", i).reshape(-1, self.nT),
            tail_mass=g("tail_mass", i).reshape(-1, self.nT),
            sample_offsets=g("sample_offsets", i) if has_samples else None,
            sample_ids=g("sample_ids", i) if has_samples else None,
            sample_counts=g("sample_counts", i) if has_samples else None,
        )


class ArrowBackend:
    """``ShardBackend`` for ``settings.format == "arrow"``."""

    name = "arrow"
    is_dir = False

    def write(self, path: Path, records: list[CacheRecord], settings: CacheSettings) -> None:
        _write_arrow_unit(path, records, settings)

    def open(self, base: Path, meta: Mapping[str, Any], settings: CacheSettings) -> _ArrowShard:
        return _ArrowShard(base / meta["file"], settings)
