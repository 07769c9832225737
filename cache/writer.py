"""Writing a cache: ``CacheWriter`` writes one rank's units as shards and journals each; rank 0's
``finalize`` checks every unit, writes the index and, last, the manifest (folder layout: ``cache.manifest``).
The writer reaches a shard format only through ``cache.backends``."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cache.backends import backend_for
from cache.codec import PAD_LOGPROB, row_kl
from cache.manifest import (
    INDEX,
    JOURNAL_RE,
    MANIFEST,
    RESUME_HINT,
    diff_keys,
    files_hash,
    files_present,
    manifest_hash,
    read_journal,
    unit_name,
)
from cache.schema import (
    FORMAT_VERSION,
    CacheError,
    CacheRecord,
    CacheSettings,
    FingerprintMismatch,
    normalize_record,
)
from cache.util import (
    FolderLock,
    Locked,
    UserError,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    copy_tree_plain,
    file_hash,
    fsync_dir,
    fsync_tree,
    json_hash,
    tree_files,
)
from cache.version import __version__

TMP_PREFIX = ".tmp-"
_UNIT_RE = re.compile(r"^unit-(\d{6,})\.(arrow|zarr)$")
_LEFTOVER_RE = re.compile(r"^\..+(\.tmp|\.old-\d+)$")  # of atomic_write_bytes / atomic_replace_dir
_RESERVED = {MANIFEST, INDEX}


def _code_version() -> str:
    return __version__


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class CacheWriter:
    """Writes units of one rank; ``finalize`` (rank 0, after all ranks are done) publishes the cache."""

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping[str, Any], settings: CacheSettings,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))
        self.fingerprint_digest = json_hash(self.fingerprint)
        self.settings = settings
        self.rank, self.world_size = rank, world_size
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = FolderLock(self.path / f"lock.rank{rank}", command=f"teacher-cache rank {rank}",
                                    busy=f"another teacher-cache process is writing to {self.path} (rank "
                                         f"{rank})", advice="wait for it to finish or stop it")
        except Locked as e:
            raise CacheError(str(e)) from None
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @property
    def journal_path(self) -> Path:
        return self.path / f"journal.rank{self.rank}.jsonl"

    def _header(self) -> dict[str, Any]:
        return {"type": "header", "format_version": FORMAT_VERSION, "code_version": _code_version(),
                "fingerprint": self.fingerprint, "fingerprint_digest": self.fingerprint_digest,
                "settings": self.settings.to_json(), "rank": self.rank, "world_size": self.world_size}

    def _check_same(self, where: str, fingerprint: Any, settings: Any, version: Any) -> None:
        if version != FORMAT_VERSION:
            raise FingerprintMismatch(f"{where} has cache format_version {version!r}, this code writes "
                                      f"{FORMAT_VERSION}; use another --out or delete the folder")
        diff = diff_keys(fingerprint, self.fingerprint)
        diff += [f"settings.{d}" for d in diff_keys(settings, self.settings.to_json())]
        if diff:
            raise FingerprintMismatch(
                f"{where} was made with a different fingerprint (differs: {', '.join(diff)}); "
                f"use another --out or delete the folder {self.path}")

    def _open(self) -> None:
        mpath = self.path / MANIFEST
        if mpath.exists():
            try:
                m = json.loads(mpath.read_text())
            except ValueError:
                raise CacheError(f"{mpath} is corrupt; delete the folder {self.path} and rerun") from None
            self._check_same(str(mpath), m.get("fingerprint"), m.get("settings"), m.get("format_version"))
        entries = self._scan(check_headers=True)
        header, _own, good = (read_journal(self.journal_path) if self.journal_path.exists()
                              else (None, [], 0))
        if self.journal_path.exists() and good < self.journal_path.stat().st_size:
            with open(self.journal_path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        if header is None:
            self.journal_path.unlink(missing_ok=True)
            self._append(self._header())
        self._cleanup(entries, all_ranks=self.world_size == 1)

    def _journals(self) -> list[Path]:
        return sorted(p for p in self.path.iterdir() if JOURNAL_RE.match(p.name))

    def _scan(self, check_headers: bool = False) -> dict[int, list[dict[str, Any]]]:
        """Per unit, its journal entries whose files are present with the recorded sizes, newest first
        within a journal (a unit is normally journalled once; twice after a rewrite or a change of ranks)."""
        found: dict[int, list[dict[str, Any]]] = {}
        for jp in self._journals():
            header, entries, _ = read_journal(jp)
            if check_headers and header is not None:
                self._check_same(str(jp), header.get("fingerprint"), header.get("settings"),
                                 header.get("format_version"))
            for e in reversed(entries):
                if files_present(self.path, e["files"]) is None:
                    found.setdefault(int(e["unit"]), []).append(e)
        return found

    def _pick(self, unit: int, candidates: list[dict[str, Any]], check_hashes: bool) -> dict[str, Any]:
        if not check_hashes:
            return candidates[0]
        for e in candidates:
            if all(file_hash(self.path / f["path"]) == f["hash"] for f in e["files"]):
                return e
        raise CacheError(f"{self.path}: shard {candidates[0]['file']} does not match its journalled hash; "
                         f"delete that shard and {RESUME_HINT}")

    def _cleanup(self, entries: dict[int, list[dict[str, Any]]], all_ranks: bool) -> None:
        own = f"{TMP_PREFIX}r{self.rank}-"
        for p in self.path.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if all_ranks or p.name.startswith(own):
                    _remove(p)
            elif all_ranks and _LEFTOVER_RE.match(p.name):
                _remove(p)
            elif all_ranks and (m := _UNIT_RE.match(p.name)):
                if all(e["file"] != p.name for e in entries.get(int(m.group(1)), [])):
                    _remove(p)

    def _append(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        new = not self.journal_path.exists()
        with open(self.journal_path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.path)

    def done_units(self) -> set[int]:
        """Units already committed by any rank (files present with their journalled sizes)."""
        return set(self._scan())

    def write_unit(self, unit_id: int, records: Iterable[CacheRecord | Mapping[str, Any]]) -> dict[str, Any]:
        """Write one unit's records as a shard (temp name, fsync, rename, fsync dir) and journal it."""
        if self._lock.fd is None:
            raise CacheError(f"writer for {self.path} is closed")
        recs = [normalize_record(r, self.settings) for r in records]
        fmt = self.settings.format
        final = self.path / unit_name(unit_id, fmt)
        tmp = self.path / f"{TMP_PREFIX}r{self.rank}-{final.name}"
        _remove(tmp)
        backend = backend_for(fmt)
        backend.write(tmp, recs, self.settings)
        if backend.is_dir:
            fsync_tree(tmp)
            atomic_replace_dir(tmp, final)
        else:
            os.replace(tmp, final)
            fsync_dir(self.path)
        files = tree_files(final, self.path)
        lengths = [int(r.input_ids.shape[0]) for r in recs]
        sup = [r.num_supervised for r in recs]
        entry = {
            "type": "unit", "unit": int(unit_id), "rank": self.rank, "file": final.name, "files": files,
            "bytes": sum(f["bytes"] for f in files), "hash": files_hash(files),
            "first_seq": recs[0].seq_id if recs else None, "num_seqs": len(recs),
            "num_tokens": sum(lengths), "num_supervised": sum(sup),
            "seq_ids": [r.seq_id for r in recs], "lengths": lengths, "supervised": sup,
        }
        if self.settings.encoding == "compact":
            entry["fidelity"] = self._fidelity(backend.open(self.path, entry, self.settings), recs)
        self._append(entry)
        return entry

    def _fidelity(self, shard: Any, recs: list[CacheRecord]) -> dict[str, Any]:
        """Read the shard just written back and measure, per row and temperature, KL(exact || decoded) over
        the decoded row's bins; raise if anything but the teacher rows differs from what was given."""
        temps = self.settings.temperatures
        kl_sum, kl_max, rows, kept = np.zeros(len(temps)), np.zeros(len(temps)), 0, 0
        for i, r in enumerate(recs):
            d = shard.record(i)
            same = (d.seq_id == r.seq_id and np.array_equal(d.input_ids, r.input_ids)
                    and np.array_equal(d.loss_mask, r.loss_mask) and d.topk_ids.shape == r.topk_ids.shape)
            if self.settings.samples > 0:
                same = same and all(np.array_equal(getattr(d, f), getattr(r, f))
                                    for f in ("sample_offsets", "sample_ids", "sample_counts"))
            if not same:
                raise CacheError(f"{self.path}: record seq_id={r.seq_id} does not decode to what was written "
                                 f"(compact encoding); please report this with the teacher-cache command")
            kl = row_kl(r, d, temps)
            if kl.size:
                kl_sum += kl.sum(0)
                kl_max = np.maximum(kl_max, kl.max(0))
            rows += kl.shape[0]
            kept += int((d.topk_logprobs.astype(np.float32) > PAD_LOGPROB / 2).sum())
        return {"rows": rows, "kept_ids": kept, "kl_sum": kl_sum.tolist(), "kl_max": kl_max.tolist()}

    def finalize(self, num_units: int, attachments: Mapping[str, str | os.PathLike] | None = None,
                 stats: Mapping[str, Any] | None = None, tokenizer: Mapping[str, Any] | None = None,
                 check_hashes: bool = True) -> dict[str, Any]:
        """Rank 0, after every rank has written its units: check units 0..num_units-1, copy attachments,
        write the index and, last, the manifest. Returns the manifest."""
        if self.rank != 0:
            raise CacheError(f"finalize runs on rank 0 only (this writer is rank {self.rank})")
        t0 = time.time()
        entries = self._scan(check_headers=True)
        missing = [u for u in range(num_units) if u not in entries]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise CacheError(f"{self.path}: {len(missing)} of {num_units} units are not written or not "
                             f"intact (units {shown}); {RESUME_HINT}")
        extra = sorted(u for u in entries if u >= num_units)
        if extra:
            raise CacheError(f"{self.path}: journals hold units {extra[:10]} beyond num_units={num_units}; "
                             f"use another --out or delete the folder")
        shards = [self._pick(u, entries[u], check_hashes) for u in range(num_units)]
        seq_ids = np.array([s for e in shards for s in e["seq_ids"]], dtype=np.int64)
        if len(np.unique(seq_ids)) != len(seq_ids):
            raise CacheError(f"{self.path}: some seq_id appears in more than one unit; units must be "
                             f"disjoint ranges of sequences (use another --out or delete the folder)")
        self._cleanup(entries, all_ranks=True)
        attached = self._copy_attachments(attachments or {})
        lengths = np.array([x for e in shards for x in e["lengths"]], dtype=np.int64)
        sup = np.array([x for e in shards for x in e["supervised"]], dtype=np.int64)
        unit_of = np.repeat(np.arange(num_units, dtype=np.int64), [e["num_seqs"] for e in shards])
        buf = io.BytesIO()
        np.savez(buf, seq_id=seq_ids, length=lengths, num_supervised=sup, unit=unit_of)
        atomic_write_bytes(self.path / INDEX, buf.getvalue())
        total_bytes = sum(e["bytes"] for e in shards)
        n_tok, n_sup = int(lengths.sum()), int(sup.sum())
        all_stats = {"shard_bytes": total_bytes,
                     "bytes_per_token": total_bytes / n_tok if n_tok else None,
                     "bytes_per_supervised_token": total_bytes / n_sup if n_sup else None,
                     "finalize_seconds": None}
        all_stats.update(stats or {})
        if self.settings.encoding == "compact":
            rows = sum(e["fidelity"]["rows"] for e in shards)
            all_stats["fidelity"] = {
                "temperatures": list(self.settings.temperatures), "rows": rows,
                "mean_kl": [sum(e["fidelity"]["kl_sum"][i] for e in shards) / max(rows, 1)
                            for i in range(len(self.settings.temperatures))],
                "max_kl": [max((e["fidelity"]["kl_max"][i] for e in shards), default=0.0)
                           for i in range(len(self.settings.temperatures))],
                "mean_kept_ids": sum(e["fidelity"]["kept_ids"] for e in shards) / max(rows, 1),
            }
        s = self.settings
        manifest = {
            "format": s.format, "format_version": FORMAT_VERSION, "code_version": _code_version(),
            "fingerprint": self.fingerprint, "fingerprint_digest": self.fingerprint_digest,
            "settings": s.to_json(), "num_units": num_units, "num_sequences": int(len(seq_ids)),
            "num_tokens": n_tok, "num_supervised": n_sup, "topk": s.topk, "samples": s.samples,
            "temperatures": list(s.temperatures), "vocab_size": s.vocab_size, "logprob_dtype": s.dtype,
            "encoding": s.encoding, "top_p": s.top_p,
            "tokenizer": dict(tokenizer) if tokenizer is not None else None,
            "shards": [{k: e[k] for k in ("unit", "file", "files", "bytes", "hash", "first_seq", "num_seqs",
                                          "num_tokens", "num_supervised")} for e in shards],
            "index": tree_files(self.path / INDEX, self.path)[0],
            "attachments": attached,
            "stats": all_stats,
            "created_unix": time.time(),
        }
        manifest["stats"]["finalize_seconds"] = round(time.time() - t0, 3)
        manifest["manifest_hash"] = manifest_hash(json.loads(json.dumps(manifest)))
        atomic_write_json(self.path / MANIFEST, manifest)
        return manifest

    def _copy_attachments(self, attachments: Mapping[str, str | os.PathLike]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, src in sorted(attachments.items()):
            src = Path(src)
            if (not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or name in _RESERVED
                    or _UNIT_RE.match(name) or name.startswith(("journal", "lock"))):
                raise UserError(f"attachment name {name!r} is not allowed; use a plain name like 'tokenizer'")
            if not src.is_dir():
                raise UserError(f"attachment {name!r}: {src} is not a directory")
            tmp = self.path / f"{TMP_PREFIX}r{self.rank}-attach-{name}"
            _remove(tmp)
            copy_tree_plain(src, tmp)
            fsync_tree(tmp)
            atomic_replace_dir(tmp, self.path / name)
            files = tree_files(self.path / name, self.path)
            out[name] = {"dir": name, "files": files, "hash": files_hash(files)}
        return out

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
