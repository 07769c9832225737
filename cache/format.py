"""The teacher cache on disk: writer, reader, journals, manifest and verify (see docs/cache-spec.md).

A cache folder holds one shard per unit (a deterministic range of sequences), one append-only journal per
rank (``journal.rank{r}.jsonl``: a header line with the fingerprint, then one line per committed unit), one
lock file per rank, the attachments (e.g. ``tokenizer/``), a small ``index.npz`` (seq_id, length and
supervised count per sequence) and, written last, ``manifest.json``. Without the manifest the folder is not a
cache. Shards are Arrow IPC files (``unit-000000.arrow``, one record batch, one row per sequence, every
variable-length field a ``large_list`` column, ``cache.arrow_backend``) or Zarr v3 groups
(``unit-000000.zarr/``, ``cache.zarr_backend``). The record and settings types and the backend interface are
in ``cache.schema`` (re-exported here); this module reaches a backend only through ``cache.backends``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cache.backends import backend_for
from cache.codec import PAD_LOGPROB, row_kl
from cache.schema import (  # noqa: F401 (re-exported: the cache's public types live in cache.schema)
    FORMAT_VERSION,
    FORMATS,
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
    tree_files,
)
from cache.util import json_hash as _json_hash
from cache.version import __version__

MANIFEST = "manifest.json"
INDEX = "index.npz"
TMP_PREFIX = ".tmp-"
_UNIT_RE = re.compile(r"^unit-(\d{6,})\.(arrow|zarr)$")
_JOURNAL_RE = re.compile(r"^journal\.rank(\d+)\.jsonl$")
_LEFTOVER_RE = re.compile(r"^\..+(\.tmp|\.old-\d+)$")  # of atomic_write_bytes / atomic_replace_dir
_RESERVED = {MANIFEST, INDEX}
_RESUME_HINT = "rerun the same teacher-cache command to resume"


def _code_version() -> str:
    return __version__


# ----------------------------------------------------------------------------------------------------------
# Files, journals, locks


def unit_name(unit: int, fmt: str) -> str:
    return f"unit-{unit:06d}.{fmt}"


def _files_hash(files: list[dict[str, Any]]) -> str:
    if len(files) == 1:
        return files[0]["hash"]
    return _json_hash([[f["path"], f["bytes"], f["hash"]] for f in files])


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _files_present(base: Path, files: list[dict[str, Any]]) -> str | None:
    """None if every file exists with its recorded size, else what is wrong with the first bad one."""
    for f in files:
        try:
            size = (base / f["path"]).stat().st_size
        except FileNotFoundError:
            return f"{f['path']} is missing"
        if size != f["bytes"]:
            return f"{f['path']} has {size} bytes, expected {f['bytes']} (truncated or overwritten)"
    return None


def _read_journal(path: Path) -> tuple[dict | None, list[dict], int]:
    """(header, unit entries, byte length of the intact prefix). A torn last line (crash while appending)
    is ignored; a corrupt line elsewhere is a CacheError."""
    data = path.read_bytes()
    header, entries, good = None, [], 0
    pos = 0
    lines = data.split(b"\n")
    for idx, line in enumerate(lines):
        is_tail = idx == len(lines) - 1  # bytes after the last newline: a torn append, or b""
        end = pos + len(line) + (0 if is_tail else 1)
        if is_tail:
            break
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError
        except ValueError:
            if all(not rest.strip(b"\x00 ") for rest in lines[idx + 1:]):
                break
            raise CacheError(f"journal {path} line {idx + 1} is corrupt; delete the folder and rerun") \
                from None
        if obj.get("type") == "header":
            header = obj
        elif obj.get("type") == "unit":
            entries.append(obj)
        good = end
        pos = end
    return header, entries, good


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(value)"]


def _load_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CacheError(f"{path} does not exist or is not a folder; run teacher-cache with --out {path}")
    if not mpath.exists():
        raise CacheError(f"{path} is not a finished cache; {_RESUME_HINT} (it has no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise CacheError(f"{mpath} is not valid JSON ({e}); {_RESUME_HINT}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format_version {version!r} but this code reads version "
                         f"{FORMAT_VERSION}; rebuild the cache with this code (teacher-cache to a new --out)")
    if manifest.get("format") not in FORMATS:
        raise CacheError(f"{mpath}: unknown cache format {manifest.get('format')!r}")
    problem = _manifest_problem(path, manifest)
    if problem is not None:
        raise CacheError(f"{mpath} {problem}: it was edited or damaged after teacher-cache wrote it; restore "
                         f"the original file or rebuild the cache (teacher-cache to a new --out)")
    return manifest


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    """Content hash of the manifest without its own ``manifest_hash`` field (canonical JSON)."""
    return _json_hash({k: v for k, v in manifest.items() if k != "manifest_hash"})


def _manifest_problem(path: Path, m: Mapping[str, Any]) -> str | None:
    """What is inconsistent in a parsed manifest, or None. Checks its own content hash, the fingerprint
    digest, every duplicated setting against ``settings``, and the fingerprint, settings and shard hashes
    against the journal headers and entries (so an edit with recomputed hashes is caught too)."""
    try:
        if m.get("manifest_hash") != _manifest_hash(m):
            return "does not match its recorded content hash (manifest_hash)"
        fp, st = m["fingerprint"], m["settings"]
        if m.get("fingerprint_digest") != _json_hash(fp):
            return "has a fingerprint that does not match its fingerprint_digest"
        settings = CacheSettings.from_json(st)
        if settings.to_json() != st:
            return "has malformed settings"
        tops = {"format": settings.format, "topk": settings.topk, "samples": settings.samples,
                "temperatures": list(settings.temperatures), "vocab_size": settings.vocab_size,
                "logprob_dtype": settings.dtype, "encoding": settings.encoding, "top_p": settings.top_p}
        for key, want in tops.items():
            if m.get(key) != want:
                return f"says {key}={m.get(key)!r} but its settings say {want!r}"
        for key in ("topk", "samples", "temperatures"):
            if key in fp and fp[key] != tops[key]:
                return f"has fingerprint {key}={fp[key]!r} but its settings say {tops[key]!r}"
        tok = m.get("tokenizer") or {}
        if "hash" in tok and "tokenizer_hash" in fp and tok["hash"] != fp["tokenizer_hash"]:
            return "has a tokenizer hash that differs from the fingerprint's"
        shards = m["shards"]
        if m.get("num_units") != len(shards):
            return f"says num_units={m.get('num_units')!r} but lists {len(shards)} shards"
        for i, sh in enumerate(shards):  # unit i is shard i: the records' order is the units' order
            if sh["unit"] != i or sh["file"] != unit_name(i, settings.format):
                return (f"lists shard {sh['file']} (unit {sh['unit']}) at position {i}: shards must be "
                        f"units 0..{len(shards) - 1} in order")
        journalled: dict[int, set[str]] = {}
        journals = sorted(p for p in path.iterdir() if _JOURNAL_RE.match(p.name))
        for jp in journals:
            header, entries, _ = _read_journal(jp)
            if header is None:
                continue
            if header.get("fingerprint_digest") != m["fingerprint_digest"] or header.get("fingerprint") != fp:
                return f"has a fingerprint that differs from the one in {jp.name}"
            if header.get("settings") != st:
                diff = ", ".join(_diff_keys(header.get("settings"), st))
                return f"has settings that differ from those in {jp.name} ({diff})"
            for e in entries:
                journalled.setdefault(int(e["unit"]), set()).add(e["hash"])
        if journals:
            for sh in m["shards"]:
                if sh["hash"] not in journalled.get(int(sh["unit"]), set()):
                    return f"lists shard {sh['file']} with a hash no journal recorded"
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"is malformed ({type(e).__name__}: {e})"
    return None


# ----------------------------------------------------------------------------------------------------------
# Writer


class CacheWriter:
    """Writes units of one rank; ``finalize`` (rank 0, after all ranks are done) publishes the cache."""

    def __init__(self, path: str | os.PathLike, fingerprint: Mapping[str, Any], settings: CacheSettings,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise UserError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(dict(fingerprint)))
        self.fingerprint_digest = _json_hash(self.fingerprint)
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
        diff = _diff_keys(fingerprint, self.fingerprint)
        diff += [f"settings.{d}" for d in _diff_keys(settings, self.settings.to_json())]
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
        header, _own, good = (_read_journal(self.journal_path) if self.journal_path.exists()
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
        return sorted(p for p in self.path.iterdir() if _JOURNAL_RE.match(p.name))

    def _scan(self, check_headers: bool = False) -> dict[int, list[dict[str, Any]]]:
        """Per unit, its journal entries whose files are present with the recorded sizes, newest first
        within a journal (a unit is normally journalled once; twice after a rewrite or a change of ranks)."""
        found: dict[int, list[dict[str, Any]]] = {}
        for jp in self._journals():
            header, entries, _ = _read_journal(jp)
            if check_headers and header is not None:
                self._check_same(str(jp), header.get("fingerprint"), header.get("settings"),
                                 header.get("format_version"))
            for e in reversed(entries):
                if _files_present(self.path, e["files"]) is None:
                    found.setdefault(int(e["unit"]), []).append(e)
        return found

    def _pick(self, unit: int, candidates: list[dict[str, Any]], check_hashes: bool) -> dict[str, Any]:
        if not check_hashes:
            return candidates[0]
        for e in candidates:
            if all(file_hash(self.path / f["path"]) == f["hash"] for f in e["files"]):
                return e
        raise CacheError(f"{self.path}: shard {candidates[0]['file']} does not match its journalled hash; "
                         f"delete that shard and {_RESUME_HINT}")

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
            "bytes": sum(f["bytes"] for f in files), "hash": _files_hash(files),
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
                             f"intact (units {shown}); {_RESUME_HINT}")
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
        manifest["manifest_hash"] = _manifest_hash(json.loads(json.dumps(manifest)))
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
            out[name] = {"dir": name, "files": files, "hash": _files_hash(files)}
        return out

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Reader


def _attachment_defects(path: Path, manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(attachment name, what is wrong) for every attachment file missing, resized or changed."""
    out = []
    for name, att in (manifest.get("attachments") or {}).items():
        for f in att["files"]:
            bad = _files_present(path, [f])
            if bad is None and file_hash(path / f["path"]) != f["hash"]:
                bad = f"{f['path']} does not match its recorded hash"
            if bad is not None:
                out.append((name, bad))
    return out

VerifyMode = Literal["lazy", "all", "none"]


class CacheReader:
    """Random access to a finished cache. Picklable: shards are (re)opened lazily in each process."""

    def __init__(self, path: str | os.PathLike, verify_hashes: VerifyMode = "lazy",
                 verify_attachments: bool = False, check_records: bool = True):
        if verify_hashes not in ("lazy", "all", "none"):
            raise UserError(f"verify_hashes must be lazy, all or none, got {verify_hashes!r}")
        self.path = Path(path)
        self.verify_hashes = verify_hashes
        self.manifest = _load_manifest(self.path)
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
            bad = _files_present(self.path, s["files"])
            if bad is not None:
                raise CacheError(f"{self.path}: shard {s['file']} is damaged: {bad}; delete the folder and "
                                 f"rerun teacher-cache (or rerun it to a new --out)")
        idx = m["index"]
        bad = _files_present(self.path, [idx])
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
        bad = _attachment_defects(self.path, self.manifest)
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

    def _shard_error(self, si: int, what: str) -> CacheError:
        return CacheError(f"{self.path}: shard {self._shard_meta[si]['file']} is damaged: {what}; delete the "
                          f"folder and rerun teacher-cache (or rerun it to a new --out)")

    def _verify_shard(self, si: int) -> None:
        meta = self._shard_meta[si]
        bad = _files_present(self.path, meta["files"])
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
        bad = _files_present(self.path, meta["files"])
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


# ----------------------------------------------------------------------------------------------------------
# Verify


def _record_defects(r: CacheRecord, k: int, nT: int, samples: int, vocab: int, dtype: str) -> list[str]:
    out = []
    L = r.input_ids.shape[0]
    n = int(r.loss_mask.sum()) if r.loss_mask.shape == (L,) else -1
    if r.loss_mask.shape != (L,):
        out.append(f"len(input_ids)={L} but len(loss_mask)={r.loss_mask.shape}")
    for name, a, cols in (("topk_ids", r.topk_ids, k), ("topk_logprobs", r.topk_logprobs, k),
                          ("topk_shift", r.topk_shift, nT), ("tail_mass", r.tail_mass, nT)):
        if a.ndim != 2 or a.shape != (n, cols):
            out.append(f"{name} has shape {a.shape}, expected ({n}, {cols})")
    if out:
        return out
    for name, want in (("input_ids", np.int32), ("topk_ids", np.int32), ("topk_logprobs", dtype),
                       ("topk_shift", np.float32), ("tail_mass", np.float32)):
        if getattr(r, name).dtype != np.dtype(want):
            out.append(f"{name} has dtype {getattr(r, name).dtype}, expected {np.dtype(want)}")
    if L and (r.input_ids.min() < 0 or r.input_ids.max() >= vocab):
        out.append(f"input_ids outside [0, {vocab})")
    if n and (r.topk_ids.min() < 0 or r.topk_ids.max() >= vocab):
        out.append(f"topk_ids outside [0, {vocab})")
    lp = r.topk_logprobs.astype(np.float32)
    if not np.isfinite(lp).all() or (lp > 0).any():
        out.append("topk_logprobs not finite or > 0")
    elif (np.diff(lp, axis=1) > 0).any():
        out.append("topk_logprobs not sorted descending")
    if not np.isfinite(r.tail_mass).all() or (r.tail_mass < 0).any() or (r.tail_mass > 1).any():
        out.append("tail_mass not finite or outside [0, 1]")
    if not np.isfinite(r.topk_shift).all():
        out.append("topk_shift not finite")
    t0 = int(np.flatnonzero(r.loss_mask)[0]) if n else None
    if n and (t0 < 1 or r.assistant_start != t0):
        out.append(f"assistant_start={r.assistant_start} is not the first supervised position {t0} (>= 1)")
    if samples > 0:
        off, ids, cnt = r.sample_offsets, r.sample_ids, r.sample_counts
        if off is None or ids is None or cnt is None:
            return out + ["sample fields missing"]
        if off.shape != (n + 1,) or off[0] != 0 or off[-1] != len(ids) or (np.diff(off) < 0).any():
            return out + [f"sample_offsets malformed (shape {off.shape}, {len(ids)} ids)"]
        if cnt.shape != ids.shape:
            return out + ["sample_counts and sample_ids differ in length"]
        if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
            out.append(f"sample_ids outside [0, {vocab})")
        if n and (np.diff(off) == 0).any():
            out.append("a row has no sampled ids")
        elif n and (np.add.reduceat(cnt.astype(np.int64), off[:-1]) != samples).any():
            out.append(f"sample counts do not sum to samples={samples} in every row")
    elif r.sample_ids is not None:
        out.append("sample fields present but samples == 0")
    return out


def verify_cache(path: str | os.PathLike) -> list[str]:
    """Every defect found in the cache at ``path`` (empty list if it is intact and consistent); CacheError
    when there is no folder at ``path`` to verify."""
    path = Path(path)
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise CacheError(f"{path} {what}; pass the folder teacher-cache wrote (its --out)")
    try:
        m = _load_manifest(path)
    except CacheError as e:
        return [str(e)]
    defects: list[str] = []
    bad_shards: set[int] = set()
    for si, s in enumerate(m["shards"]):
        bad = _files_present(path, s["files"])
        if bad is None:
            for f in s["files"]:
                if file_hash(path / f["path"]) != f["hash"]:
                    bad = f"{f['path']} does not match its recorded hash"
                    break
        if bad is not None:
            defects.append(f"shard {s['file']}: {bad}")
            bad_shards.add(si)
    defects += [f"attachment {name}: {bad}" for name, bad in _attachment_defects(path, m)]
    try:
        reader = open_cache(path, verify_hashes="none", check_records=False)  # defects listed one by one
    except CacheError as e:
        return defects + [str(e)] if not defects else defects
    k, nT, samples, vocab = reader.topk, len(reader.temperatures), reader.samples, reader.vocab_size
    dt = reader.settings.dtype
    n_tok = n_sup = 0
    for si, s in enumerate(m["shards"]):
        if si in bad_shards:
            continue
        for i in range(int(reader._starts[si]), int(reader._starts[si + 1])):
            try:
                r = reader[i]
            except CacheError as e:
                defects.append(str(e))
                break
            where = f"shard {s['file']} record {i} (seq_id {r.seq_id})"
            defects += [f"{where}: {d}" for d in _record_defects(r, k, nT, samples, vocab, dt)]
            if r.input_ids.shape[0] != reader.lengths[i] or r.num_supervised != reader.num_supervised[i]:
                defects.append(f"{where}: length/supervised count disagree with the index")
            if r.seq_id != reader.seq_ids[i]:
                defects.append(f"{where}: seq_id disagrees with the index ({reader.seq_ids[i]})")
            n_tok += r.input_ids.shape[0]
            n_sup += r.num_supervised
    if not bad_shards and (n_tok != m["num_tokens"] or n_sup != m["num_supervised"]):
        defects.append(f"manifest totals (num_tokens={m['num_tokens']}, "
                       f"num_supervised={m['num_supervised']}) "
                       f"disagree with the records ({n_tok}, {n_sup})")
    return defects
