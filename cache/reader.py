"""Reading a finished cache: ``open_cache`` checks the manifest (``cache.manifest``) and the index, then
``CacheReader`` serves records by sequence, each shard hash-checked when first opened. The reader reaches a
shard format only through ``cache.backends``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cache.backends import backend_for
from cache.manifest import attachment_defects, files_present, load_manifest
from cache.schema import CacheError, CacheRecord, CacheSettings
from cache.util import UserError, file_hash

VerifyMode = Literal["lazy", "all", "none"]


class CacheReader:
    """Random access to a finished cache. Picklable: shards are (re)opened lazily in each process."""

    def __init__(self, path: str | os.PathLike, verify_hashes: VerifyMode = "lazy",
                 verify_attachments: bool = False, check_records: bool = True):
        if verify_hashes not in ("lazy", "all", "none"):
            raise UserError(f"verify_hashes must be lazy, all or none, got {verify_hashes!r}")
        self.path = Path(path)
        self.verify_hashes = verify_hashes
        self.manifest = load_manifest(self.path)
        m = self.manifest
        self.format: str = m["format"]
        self.settings = CacheSettings.from_json(m["settings"])
        self.topk: int = m["topk"]
        self.samples: int = m["samples"]
        self.temperatures: tuple[float, ...] = tuple(m["temperatures"])
        self.vocab_size: int = m["vocab_size"]
        self.fingerprint: dict[str, Any] = m["fingerprint"]
        self.fingerprint_digest: str = m["fingerprint_digest"]
        self._shard_meta: list[dict[str, Any]] = m["shards"]
        for s in self._shard_meta:
            bad = files_present(self.path, s["files"])
            if bad is not None:
                raise CacheError(f"{self.path}: shard {s['file']} is damaged: {bad}; delete the folder and "
                                 f"rerun teacher-cache (or rerun it to a new --out)")
        idx = m["index"]
        bad = files_present(self.path, [idx])
        if bad is None and file_hash(self.path / idx["path"]) != idx["hash"]:
            bad = f"{idx['path']} does not match its recorded hash"
        if bad is not None:
            raise CacheError(f"{self.path}: index is damaged: {bad}; delete the folder and rerun "
                             f"teacher-cache")
        with np.load(self.path / idx["path"], allow_pickle=False) as z:
            self.seq_ids = z["seq_id"]
            self.lengths = z["length"]
            self.num_supervised = z["num_supervised"]
            index_units = z["unit"] if "unit" in z.files else None
        counts = np.array([s["num_seqs"] for s in self._shard_meta], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        if self._starts[-1] != len(self.lengths):
            raise CacheError(f"{self.path}: index has {len(self.lengths)} sequences but shards "
                             f"{self._starts[-1]}; delete the folder and rerun teacher-cache")
        problem = self._index_problem(index_units)
        if problem is not None:
            raise CacheError(f"{self.path}: the index disagrees with the manifest ({problem}); delete the "
                             f"folder and rerun teacher-cache (or rerun it to a new --out)")
        self.check_records = check_records
        self._verified: set[int] = set()
        self._shards: dict[int, Any] = {}
        if verify_hashes == "all":
            for si in range(len(self._shard_meta)):
                self._verify_shard(si)
        if verify_attachments:
            self.verify_attachments()

    def _index_problem(self, index_units: np.ndarray | None) -> str | None:
        """What in ``index.npz`` disagrees with the manifest's shard list and totals, or None (cheap: the
        index and manifest only; each record is checked against its index row when it is read)."""
        m, starts = self.manifest, self._starts
        if len(self.seq_ids) != len(self.lengths) or len(self.num_supervised) != len(self.lengths):
            return "its arrays differ in length"
        if len(np.unique(self.seq_ids)) != len(self.seq_ids):
            return "a seq_id appears twice"
        if index_units is not None and not np.array_equal(
                index_units, np.repeat(np.arange(len(self._shard_meta)), np.diff(starts))):
            return "its unit column is not the shards' order"
        tokens, sup = (np.diff(np.concatenate([[0], np.cumsum(a, dtype=np.int64)])[starts])
                       for a in (self.lengths, self.num_supervised))  # per shard
        for si, s in enumerate(self._shard_meta):
            if not s["num_seqs"]:
                continue
            a = int(starts[si])
            if (s["first_seq"] != int(self.seq_ids[a]) or s["num_tokens"] != int(tokens[si])
                    or s["num_supervised"] != int(sup[si])):
                return f"shard {s['file']}: first seq_id, tokens or supervised tokens"
        if (m["num_sequences"] != len(self.lengths) or m["num_tokens"] != int(self.lengths.sum())
                or m["num_supervised"] != int(self.num_supervised.sum())):
            return "the manifest's totals"
        return None

    def verify_attachments(self) -> None:
        """Check every attachment file (e.g. ``tokenizer/``) against its recorded size and content hash;
        CacheError naming the first damaged or missing file. Training calls this when it opens a cache, as
        ``cache verify`` does."""
        bad = attachment_defects(self.path, self.manifest)
        if bad:
            name, what = bad[0]
            raise CacheError(f"{self.path}: attachment {name} is damaged: {what}; delete the folder and "
                             f"rerun teacher-cache (or rerun it to a new --out)")

    @property
    def tokenizer_dir(self) -> Path | None:
        att = self.manifest.get("attachments", {}).get("tokenizer")
        return self.path / att["dir"] if att else None

    def temperature_index(self, temperature: float) -> int:
        for i, t in enumerate(self.temperatures):
            if math.isclose(t, float(temperature), rel_tol=1e-6, abs_tol=1e-9):
                return i
        raise CacheError(f"temperature {temperature} is not in the cache {self.path}; it serves temperatures "
                         f"{', '.join(f'{t:g}' for t in self.temperatures)} (rerun teacher-cache with "
                         f"--temperatures including {temperature:g} to a new --out)")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shard_records(self, si: int) -> range:
        """The indices of the records shard ``si`` holds (shards hold consecutive records, in unit order)."""
        return range(int(self._starts[si]), int(self._starts[si + 1]))

    def _shard_error(self, si: int, what: str) -> CacheError:
        return CacheError(f"{self.path}: shard {self._shard_meta[si]['file']} is damaged: {what}; delete the "
                          f"folder and rerun teacher-cache (or rerun it to a new --out)")

    def _verify_shard(self, si: int) -> None:
        meta = self._shard_meta[si]
        bad = files_present(self.path, meta["files"])
        if bad is not None:
            raise self._shard_error(si, bad)
        for f in meta["files"]:
            if file_hash(self.path / f["path"]) != f["hash"]:
                raise self._shard_error(si, f"{f['path']} does not match its recorded hash")
        self._verified.add(si)

    def _shard(self, si: int) -> Any:
        shard = self._shards.get(si)
        if shard is not None:
            return shard
        if self.verify_hashes != "none" and si not in self._verified:
            self._verify_shard(si)
        meta = self._shard_meta[si]
        bad = files_present(self.path, meta["files"])
        if bad is not None:
            raise self._shard_error(si, bad)
        try:
            shard = backend_for(self.format).open(self.path, meta, self.settings)
        except CacheError:
            raise
        except Exception as e:
            raise self._shard_error(si, f"cannot be read ({type(e).__name__}: {e})") from None
        if shard.num_records != meta["num_seqs"]:
            raise self._shard_error(si, f"holds {shard.num_records} records, expected {meta['num_seqs']}")
        self._shards[si] = shard
        return shard

    def __getitem__(self, i: int) -> CacheRecord:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for a cache of {n} sequences")
        si = int(np.searchsorted(self._starts, i, side="right")) - 1
        shard = self._shard(si)
        try:
            r = shard.record(i - int(self._starts[si]))
        except CacheError:
            raise
        except Exception as e:
            raise self._shard_error(si, f"cannot be read ({type(e).__name__}: {e})") from None
        if self.check_records and (r.seq_id != self.seq_ids[i] or r.input_ids.shape[0] != self.lengths[i]
                                   or r.num_supervised != self.num_supervised[i]):
            raise self._shard_error(si, f"record {i} (seq_id {r.seq_id}) disagrees with the index (seq_id "
                                        f"{self.seq_ids[i]}, {self.lengths[i]} tokens, "
                                        f"{self.num_supervised[i]} supervised)")
        return r

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def close(self) -> None:
        self._shards.clear()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_cache(path: str | os.PathLike, verify_hashes: VerifyMode = "lazy",
               verify_attachments: bool = False, check_records: bool = True) -> CacheReader:
    """Open a finished cache; CacheError if it is incomplete, damaged, edited or of another format version,
    or its shards are not its units in order or disagree with its index (with ``verify_attachments``, also
    if an attachment such as ``tokenizer/`` is damaged or missing). With ``check_records`` every record read
    is checked against its index row (seq_id, length, supervised count), as ``verify_cache`` does."""
    return CacheReader(path, verify_hashes=verify_hashes, verify_attachments=verify_attachments,
                       check_records=check_records)
