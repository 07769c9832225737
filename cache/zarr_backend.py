"""Zarr v3 shards for the teacher cache (``settings.format = "zarr"``); the record and settings types are in
cache.schema, the writer and reader that call this backend in cache.writer and cache.reader.

One unit is one Zarr group ``unit-000000.zarr/`` of flat arrays: per sequence ``seq_id``, ``assistant_start``,
``tok_offsets`` and ``row_offsets`` ([S+1] into the token and teacher-row arrays); per token ``input_ids`` and
``loss_mask``; per teacher row ``topk_ids``/``topk_logprobs`` ([R, k]) and ``topk_shift``/``tail_mass``
([R, nT]); with samples, ``sample_row_offsets`` ([R+1]) into ``sample_ids``/``sample_counts``. Every chunk
goes through a crc32c codec and is always written (``write_empty_chunks``), so the journal lists every
chunk file. Zarr fills a missing chunk with the fill value; the reader therefore checks, before every read,
that each chunk it touches exists with its journalled size, and raises CacheError otherwise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cache.codec import decode_record, encode_record
from cache.schema import CacheError, CacheRecord, CacheSettings

_TOKEN_CHUNK = 1 << 16
_SMALL = ("seq_id", "assistant_start", "tok_offsets", "row_offsets")


def _offsets(sizes: list[int]) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sizes, dtype=np.int64), out=out[1:])
    return out


def write_zarr_unit(path: Path, records: list[CacheRecord], settings: CacheSettings) -> None:
    """Write ``records`` as a new Zarr v3 group at ``path`` (files are not fsynced here)."""
    k, nT = settings.topk, len(settings.temperatures)
    cat = np.concatenate
    if settings.encoding == "compact":
        blobs = [np.frombuffer(encode_record(r, settings), dtype=np.uint8) for r in records]
        _write_group(path, settings, {
            "seq_id": np.array([r.seq_id for r in records], dtype=np.int64),
            "assistant_start": np.array([r.assistant_start for r in records], dtype=np.int64),
            "record_offsets": _offsets([b.size for b in blobs]),
            "record": cat(blobs) if blobs else np.zeros(0, np.uint8),
        })
        return
    arrays: dict[str, np.ndarray] = {
        "seq_id": np.array([r.seq_id for r in records], dtype=np.int64),
        "assistant_start": np.array([r.assistant_start for r in records], dtype=np.int64),
        "tok_offsets": _offsets([r.input_ids.shape[0] for r in records]),
        "row_offsets": _offsets([r.topk_ids.shape[0] for r in records]),
        "input_ids": cat([r.input_ids for r in records]) if records else np.zeros(0, np.int32),
        "loss_mask": cat([r.loss_mask for r in records]) if records else np.zeros(0, np.bool_),
        "topk_ids": cat([r.topk_ids for r in records]) if records else np.zeros((0, k), np.int32),
        "topk_logprobs": (cat([r.topk_logprobs for r in records]) if records
                          else np.zeros((0, k), np.dtype(settings.dtype))),
        "topk_shift": cat([r.topk_shift for r in records]) if records else np.zeros((0, nT), np.float32),
        "tail_mass": cat([r.tail_mass for r in records]) if records else np.zeros((0, nT), np.float32),
    }
    if settings.samples > 0:
        sizes = [int(d) for r in records for d in np.diff(r.sample_offsets)]
        arrays["sample_row_offsets"] = _offsets(sizes)
        arrays["sample_ids"] = cat([r.sample_ids for r in records]) if records else np.zeros(0, np.int32)
        arrays["sample_counts"] = (cat([r.sample_counts for r in records]) if records
                                   else np.zeros(0, np.int32))
    _write_group(path, settings, arrays)


def _write_group(path: Path, settings: CacheSettings, arrays: dict[str, np.ndarray]) -> None:
    import zarr
    from zarr.codecs import Crc32cCodec
    from zarr.storage import LocalStore

    group = zarr.create_group(store=LocalStore(path), zarr_format=3,
                              attributes={"fnet_distill_unit": True})
    for name, data in arrays.items():
        if data.ndim == 2:
            chunks: tuple[int, ...] = (max(1, min(settings.zarr_chunk_rows, data.shape[0])), data.shape[1])
        else:
            chunks = (max(1, min(_TOKEN_CHUNK, data.shape[0])),)
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                 compressors=[Crc32cCodec()], fill_value=0,
                                 config={"write_empty_chunks": True})
        if data.size:
            arr[...] = data


class ZarrShard:
    """Reads records of one Zarr unit; refuses to read through a missing or resized chunk file."""

    def __init__(self, base: Path, meta: dict[str, Any], settings: CacheSettings):
        import zarr
        from zarr.storage import LocalStore

        self.base = base
        self.name = meta["file"]
        self.sizes = {f["path"]: f["bytes"] for f in meta["files"]}
        self.group = zarr.open_group(store=LocalStore(base / self.name, read_only=True), mode="r")
        self.has_samples = settings.samples > 0
        self.settings = settings
        self.compact = settings.encoding == "compact"
        self.arrays = {name: self.group[name] for name in self._names()}
        small = ("seq_id", "assistant_start", "record_offsets") if self.compact else _SMALL
        self.small = {name: self._read(name, 0, self.arrays[name].shape[0]) for name in small}
        self.sample_row_offsets = None
        if self.has_samples and not self.compact:
            n_rows = self.arrays["sample_row_offsets"].shape[0]
            self.sample_row_offsets = self._read("sample_row_offsets", 0, n_rows)
        self.num_records = int(self.small["seq_id"].shape[0])

    def _names(self) -> tuple[str, ...]:
        if self.compact:
            return ("seq_id", "assistant_start", "record_offsets", "record")
        names = _SMALL + ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_shift", "tail_mass")
        return names + (("sample_row_offsets", "sample_ids", "sample_counts") if self.has_samples else ())

    def _check_chunks(self, name: str, start: int, stop: int) -> None:
        arr = self.arrays[name]
        if stop <= start:
            return
        c = arr.chunks[0]
        tail = "/0" if arr.ndim == 2 else ""
        for ci in range(start // c, (stop - 1) // c + 1):
            rel = f"{self.name}/{name}/c/{ci}{tail}"
            expected = self.sizes.get(rel)
            try:
                size = os.stat(self.base / rel).st_size
            except FileNotFoundError:
                size = None
            if expected is None or size != expected:
                what = "missing" if size is None else f"{size} bytes, expected {expected}"
                raise CacheError(f"{self.base}: shard {self.name} is damaged: chunk {rel} is {what}; "
                                 f"delete the folder and rerun teacher-cache (or rerun it to a new --out)")

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        self._check_chunks(name, start, stop)
        return np.asarray(self.arrays[name][start:stop])

    def _read_many(self, reads: list[tuple[str, int, int]]) -> list[np.ndarray]:
        """Several slices in one round trip through zarr's event loop (one call per slice costs ~1 ms)."""
        from zarr.core.sync import sync

        for name, start, stop in reads:
            self._check_chunks(name, start, stop)

        async def gather() -> list[Any]:
            return await asyncio.gather(*(self.arrays[name].async_array.getitem(slice(start, stop))
                                          for name, start, stop in reads))

        return [np.asarray(x) for x in sync(gather())]

    def record(self, i: int) -> CacheRecord:
        if self.compact:
            b0, b1 = (int(x) for x in self.small["record_offsets"][i:i + 2])
            return decode_record(int(self.small["seq_id"][i]), int(self.small["assistant_start"][i]),
                                 self._read("record", b0, b1), self.settings)
        t0, t1 = (int(x) for x in self.small["tok_offsets"][i:i + 2])
        r0, r1 = (int(x) for x in self.small["row_offsets"][i:i + 2])
        reads = [("input_ids", t0, t1), ("loss_mask", t0, t1), ("topk_ids", r0, r1),
                 ("topk_logprobs", r0, r1), ("topk_shift", r0, r1), ("tail_mass", r0, r1)]
        off = None
        if self.has_samples:
            so = self.sample_row_offsets[r0:r1 + 1]
            off = so - so[0]
            reads += [("sample_ids", int(so[0]), int(so[-1])), ("sample_counts", int(so[0]), int(so[-1]))]
        got = self._read_many(reads)
        return CacheRecord(
            seq_id=int(self.small["seq_id"][i]),
            input_ids=got[0],
            loss_mask=got[1].astype(np.bool_, copy=False),
            assistant_start=int(self.small["assistant_start"][i]),
            topk_ids=got[2],
            topk_logprobs=got[3],
            topk_shift=got[4],
            tail_mass=got[5],
            sample_offsets=off,
            sample_ids=got[6] if self.has_samples else None,
            sample_counts=got[7] if self.has_samples else None,
        )


class ZarrBackend:
    """``ShardBackend`` for ``settings.format == "zarr"``."""

    name = "zarr"
    is_dir = True

    def write(self, path: Path, records: list[CacheRecord], settings: CacheSettings) -> None:
        write_zarr_unit(path, records, settings)

    def open(self, base: Path, meta: Mapping[str, Any], settings: CacheSettings) -> ZarrShard:
        return ZarrShard(base, dict(meta), settings)
