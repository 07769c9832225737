"""The cache folder and its manifest: names, journal lines and the manifest's checks (docs/cache-spec.md).

A cache folder holds one shard per unit (a deterministic range of sequences), one append-only journal per
rank (``journal.rank{r}.jsonl``: a header line with the fingerprint, then one line per committed unit), one
lock file per rank, the attachments (e.g. ``tokenizer/``), a small ``index.npz`` (seq_id, length and
supervised count per sequence) and, written last, ``manifest.json``. Without the manifest the folder is not a
cache. Shards are Arrow IPC files (``unit-000000.arrow``, one record batch, one row per sequence, every
variable-length field a ``large_list`` column, ``cache.arrow_backend``) or Zarr v3 groups
(``unit-000000.zarr/``, ``cache.zarr_backend``).

``cache.writer`` writes the folder, ``cache.reader`` opens a finished one and ``cache.verify`` checks every
record; this module holds what they share: the names, reading a journal, and loading a manifest with its
content hash, fingerprint and settings cross-checked against the journals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cache.schema import FORMAT_VERSION, FORMATS, CacheError, CacheSettings
from cache.util import file_hash, json_hash

MANIFEST = "manifest.json"
INDEX = "index.npz"
JOURNAL_RE = re.compile(r"^journal\.rank(\d+)\.jsonl$")
RESUME_HINT = "rerun the same teacher-cache command to resume"


def unit_name(unit: int, fmt: str) -> str:
    return f"unit-{unit:06d}.{fmt}"


def files_hash(files: list[dict[str, Any]]) -> str:
    if len(files) == 1:
        return files[0]["hash"]
    return json_hash([[f["path"], f["bytes"], f["hash"]] for f in files])


def files_present(base: Path, files: list[dict[str, Any]]) -> str | None:
    """None if every file exists with its recorded size, else what is wrong with the first bad one."""
    for f in files:
        try:
            size = (base / f["path"]).stat().st_size
        except FileNotFoundError:
            return f"{f['path']} is missing"
        if size != f["bytes"]:
            return f"{f['path']} has {size} bytes, expected {f['bytes']} (truncated or overwritten)"
    return None


def read_journal(path: Path) -> tuple[dict | None, list[dict], int]:
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


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "(value)"]


def load_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise CacheError(f"{path} does not exist or is not a folder; run teacher-cache with --out {path}")
    if not mpath.exists():
        raise CacheError(f"{path} is not a finished cache; {RESUME_HINT} (it has no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as e:
        raise CacheError(f"{mpath} is not valid JSON ({e}); {RESUME_HINT}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format_version {version!r} but this code reads version "
                         f"{FORMAT_VERSION}; rebuild the cache with this code (teacher-cache to a new --out)")
    if manifest.get("format") not in FORMATS:
        raise CacheError(f"{mpath}: unknown cache format {manifest.get('format')!r}")
    problem = manifest_problem(path, manifest)
    if problem is not None:
        raise CacheError(f"{mpath} {problem}: it was edited or damaged after teacher-cache wrote it; restore "
                         f"the original file or rebuild the cache (teacher-cache to a new --out)")
    return manifest


def manifest_hash(manifest: Mapping[str, Any]) -> str:
    """Content hash of the manifest without its own ``manifest_hash`` field (canonical JSON)."""
    return json_hash({k: v for k, v in manifest.items() if k != "manifest_hash"})


def manifest_problem(path: Path, m: Mapping[str, Any]) -> str | None:
    """What is inconsistent in a parsed manifest, or None. Checks its own content hash, the fingerprint
    digest, every duplicated setting against ``settings``, and the fingerprint, settings and shard hashes
    against the journal headers and entries (so an edit with recomputed hashes is caught too)."""
    try:
        if m.get("manifest_hash") != manifest_hash(m):
            return "does not match its recorded content hash (manifest_hash)"
        fp, st = m["fingerprint"], m["settings"]
        if m.get("fingerprint_digest") != json_hash(fp):
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
        journals = sorted(p for p in path.iterdir() if JOURNAL_RE.match(p.name))
        for jp in journals:
            header, entries, _ = read_journal(jp)
            if header is None:
                continue
            if header.get("fingerprint_digest") != m["fingerprint_digest"] or header.get("fingerprint") != fp:
                return f"has a fingerprint that differs from the one in {jp.name}"
            if header.get("settings") != st:
                diff = ", ".join(diff_keys(header.get("settings"), st))
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



def attachment_defects(path: Path, manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(attachment name, what is wrong) for every attachment file missing, resized or changed."""
    out = []
    for name, att in (manifest.get("attachments") or {}).items():
        for f in att["files"]:
            bad = files_present(path, [f])
            if bad is None and file_hash(path / f["path"]) != f["hash"]:
                bad = f"{f['path']} does not match its recorded hash"
            if bad is not None:
                out.append((name, bad))
    return out
