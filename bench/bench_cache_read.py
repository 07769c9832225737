"""Random-access read throughput of the teacher cache, Arrow vs Zarr, on a synthetic cache of realistic shape
(k=64, ~150 supervised of ~250 tokens per sequence, temperatures 1 and 2, fp16 log-probs, 256 sequences per
unit). Writes bench/results/cache_read.json. Files are freshly written, so reads hit the page cache.

    python bench/bench_cache_read.py [--sequences 3000] [--reads 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cache.reader import open_cache
from cache.schema import CacheRecord, CacheSettings
from cache.writer import CacheWriter

HERE = Path(__file__).resolve().parent
VOCAB = 151_936
FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_shift", "tail_mass")


def synthetic_record(rng: np.random.Generator, seq_id: int, s: CacheSettings) -> CacheRecord:
    n = int(np.clip(rng.normal(150, 40), 20, 400))
    prompt = int(np.clip(rng.normal(100, 25), 20, 300))
    L = prompt + n
    mask = np.zeros(L, dtype=bool)
    mask[prompt:] = True
    lp = -np.sort(rng.exponential(2.0, size=(n, s.topk)), axis=1).astype(np.float32)
    return CacheRecord(
        seq_id=seq_id, input_ids=rng.integers(0, VOCAB, L, dtype=np.int32), loss_mask=mask,
        assistant_start=prompt, topk_ids=rng.integers(0, VOCAB, (n, s.topk), dtype=np.int32),
        topk_logprobs=lp.astype(s.dtype), topk_shift=rng.normal(size=(n, 2)).astype(np.float32),
        tail_mass=rng.random((n, 2), dtype=np.float32),
    )


def bench_format(root: Path, fmt: str, records: list[CacheRecord], per_unit: int, reads: int,
                 seed: int) -> dict:
    s = CacheSettings(topk=64, vocab_size=VOCAB, temperatures=(1.0, 2.0), dtype="float16", format=fmt)
    path = root / fmt
    t0 = time.perf_counter()
    with CacheWriter(path, fingerprint={"bench": "cache_read"}, settings=s) as w:
        units = [records[i:i + per_unit] for i in range(0, len(records), per_unit)]
        for u, recs in enumerate(units):
            w.write_unit(u, recs)
        m = w.finalize(len(units))
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reader = open_cache(path, verify_hashes="all")
    open_all_s = time.perf_counter() - t0
    order = np.random.default_rng(seed).integers(0, len(reader), reads)
    for i in order[: min(64, reads)]:
        reader[int(i)]
    nbytes = 0
    t0 = time.perf_counter()
    for i in order:
        rec = reader[int(i)]
        for f in FIELDS:
            nbytes += np.array(getattr(rec, f), copy=True).nbytes
    dt = time.perf_counter() - t0
    shard_bytes = sum(x["bytes"] for x in m["shards"])
    return {
        "records_per_s": reads / dt,
        "MB_per_s": nbytes / dt / 1e6,
        "mean_record_KB": nbytes / reads / 1e3,
        "reads": reads,
        "write_s": write_s,
        "open_verify_all_s": open_all_s,
        "shard_bytes": shard_bytes,
        "files": sum(len(x["files"]) for x in m["shards"]),
        "bytes_per_supervised_token": shard_bytes / m["num_supervised"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=int, default=3000)
    ap.add_argument("--per-unit", type=int, default=256)
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cache_read.json")
    args, _ = ap.parse_known_args()
    s = CacheSettings(topk=64, vocab_size=VOCAB, temperatures=(1.0, 2.0), dtype="float16")
    rng = np.random.default_rng(args.seed)
    records = [synthetic_record(rng, i, s) for i in range(args.sequences)]
    root = Path(tempfile.mkdtemp(prefix="bench_cache_read-"))
    try:
        results = {fmt: bench_format(root, fmt, records, args.per_unit, args.reads, args.seed)
                   for fmt in ("arrow", "zarr")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {
        "benchmark": "cache_read",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "config": {"sequences": args.sequences, "per_unit": args.per_unit, "topk": 64, "temperatures": [1, 2],
                   "dtype": "float16", "samples": 0,
                   "mean_supervised": float(np.mean([r.topk_ids.shape[0] for r in records])),
                   "mean_length": float(np.mean([r.input_ids.shape[0] for r in records]))},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for fmt, r in results.items():
        print(f"{fmt:5s}  {r['records_per_s']:8.0f} records/s  {r['MB_per_s']:7.1f} MB/s  "
              f"write {r['write_s']:.1f}s  open+hash {r['open_verify_all_s']:.2f}s  "
              f"{r['bytes_per_supervised_token']:.0f} B/supervised token  {r['files']} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
