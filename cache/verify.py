"""``verify_cache``: every defect of a cache folder, listed one by one (the ``cache verify`` command): the
manifest's checks (``cache.manifest``), every shard and attachment file against its hash, and every record
against the settings and the index."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cache.manifest import attachment_defects, files_present, load_manifest
from cache.reader import open_cache
from cache.schema import CacheError, CacheRecord
from cache.util import file_hash


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
        m = load_manifest(path)
    except CacheError as e:
        return [str(e)]
    defects: list[str] = []
    bad_shards: set[int] = set()
    for si, s in enumerate(m["shards"]):
        bad = files_present(path, s["files"])
        if bad is None:
            for f in s["files"]:
                if file_hash(path / f["path"]) != f["hash"]:
                    bad = f"{f['path']} does not match its recorded hash"
                    break
        if bad is not None:
            defects.append(f"shard {s['file']}: {bad}")
            bad_shards.add(si)
    defects += [f"attachment {name}: {bad}" for name, bad in attachment_defects(path, m)]
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
        for i in reader.shard_records(si):
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
