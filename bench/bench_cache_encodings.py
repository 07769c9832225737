"""Bytes per supervised token, decoded KL, write and read throughput of every cache encoding, on real
teacher distributions over chat-formatted GSM8K rows with the real Qwen2 tokenizer.

The teacher runs once per teacher (top-64 at float32, 50 and 12 Random-Sampling draws, T = 1 and 2); every
variant below is derived from those exact rows (a smaller k keeps the first k ids and moves the rest's exact
mass into the tail) and written with the real ``CacheWriter`` into a temporary folder. Bytes are the shard
bytes (input ids, masks and teacher rows: everything a training run reads) over supervised tokens. KL is the
per-row KL(exact || decoded) the writer measures (compact), or the same metric computed here against the
float32 rows (exact float16). Read throughput is records through ``open_cache(...)[i]`` (decode included)
in supervised and total tokens per second, next to what one training step consumes
(``bench/results/train.json``).

    nice -n 5 python bench/bench_cache_encodings.py --teacher gsm8k=/tmp/gsm8k-teacher [--teacher demo=DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study_cache_size import derive  # noqa: E402  (bench/ is on sys.path as the script's folder)

from cache.codec import row_kl  # noqa: E402
from cache.reader import open_cache  # noqa: E402
from cache.schema import CacheRecord, CacheSettings  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402
from pipeline.data import DataConfig, load_tokenized, load_tokenizer  # noqa: E402
from pipeline.teacher import TargetSettings, load_teacher, teacher_targets  # noqa: E402

SHARED = ROOT.parent / "shared"
TEMPS = (1.0, 2.0)
KMAX = 64
# Published reference points (bytes per token; not measured here).
PUBLISHED = [
    {"name": "DistillKit top-128 (published)", "bytes_per_token": 300},
    {"name": "DistillKit budget top-50 (published)", "bytes_per_token": 114},
    {"name": "Random-Sampling KD, ~12 unique ids (published)", "bytes_per_token": 37},
]
# (name, k, samples, settings) -- samples selects which teacher draws the variant carries.
VARIANTS = [
    ("exact fp16 top-64 (format v1 layout)", 64, 0, dict(encoding="exact", dtype="float16")),
    ("exact fp32 top-64", 64, 0, dict(encoding="exact", dtype="float32")),
    ("compact top-64 (default)", 64, 0, dict(encoding="compact")),
    ("compact top-64, lp-step 1/8", 64, 0, dict(encoding="compact", lp_step=0.125)),
    ("compact top-16", 16, 0, dict(encoding="compact")),
    ("compact top-4", 4, 0, dict(encoding="compact")),
    ("compact top-1", 1, 0, dict(encoding="compact")),
    ("compact adaptive top-p 0.9 (k <= 64)", 64, 0, dict(encoding="compact", top_p=0.9)),
    ("compact adaptive top-p 0.9 (k <= 32): the preset", 32, 0, dict(encoding="compact", top_p=0.9)),
    ("compact adaptive top-p 0.8 (k <= 16)", 16, 0, dict(encoding="compact", top_p=0.8)),
    ("compact RS 50 draws (+ top-1)", 1, 50, dict(encoding="compact")),
    ("compact RS 12 draws (+ top-1)", 1, 12, dict(encoding="compact")),
    ("exact fp16 RS 50 draws (+ top-1)", 1, 50, dict(encoding="exact", dtype="float16")),
]


def teacher_rows(teacher_dir: str, tokenizer, data, limit: int) -> tuple[list[CacheRecord], dict, dict, dict]:
    teacher = load_teacher(teacher_dir, device="cpu", dtype="float32")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = data.seqs[:limit]
    recs, s50, s12 = [], {}, {}
    ent_sum, n_rows = 0.0, 0
    for lo in range(0, len(seqs), 8):
        chunk = seqs[lo:lo + 8]
        full = teacher_targets(teacher, chunk, TargetSettings(topk=KMAX, temperatures=TEMPS, samples=50,
                                                              logprob_dtype="float32"), pad)
        few = teacher_targets(teacher, chunk, TargetSettings(topk=1, temperatures=TEMPS, samples=12, seed=1,
                                                             logprob_dtype="float32"), pad)
        for s, t, f in zip(chunk, full, few):
            recs.append(CacheRecord(s.seq_id, s.input_ids, s.loss_mask, s.assistant_start, t.topk_ids,
                                    t.topk_logprobs, t.topk_shift, t.tail_mass))
            s50[s.seq_id] = (t.sample_offsets, t.sample_ids, t.sample_counts)
            s12[s.seq_id] = (f.sample_offsets, f.sample_ids, f.sample_counts)
        with torch.inference_mode():  # entropy per supervised token at T=1 over the full vocabulary
            for s in chunk:
                logits = teacher.model(torch.from_numpy(s.input_ids.astype(np.int64))[None]).logits[0]
                t_pos = np.flatnonzero(s.loss_mask) - 1
                lp = torch.log_softmax(logits[t_pos].double(), -1)
                ent_sum += float(-(lp.exp() * lp).sum())
                n_rows += len(t_pos)
    info = {"vocab_size": teacher.vocab_size, "entropy_nats_per_token": ent_sum / max(n_rows, 1),
            "top64_mass_T1": float(np.mean([1 - r.tail_mass[:, 0].mean() for r in recs]))}
    return recs, s50, s12, info


def measure(recs: list[CacheRecord], vocab: int, k: int, samples: int, kw: dict, s50: dict, s12: dict,
            per_unit: int, tmp: Path) -> dict:
    draws = {50: s50, 12: s12}.get(samples)
    derived = [derive(r, k, draws[r.seq_id] if draws else None) for r in recs]
    s = CacheSettings(topk=k, vocab_size=vocab, samples=samples, temperatures=TEMPS, **kw)
    out = tmp / "c"
    shutil.rmtree(out, ignore_errors=True)
    units = [derived[i:i + per_unit] for i in range(0, len(derived), per_unit)]
    t0 = time.perf_counter()
    with CacheWriter(out, {"bench": kw, "k": k, "samples": samples}, s) as w:
        for u, batch in enumerate(units):
            w.write_unit(u, batch)
        m = w.finalize(len(units))
    write_s = time.perf_counter() - t0
    n_sup, n_tok = m["num_supervised"], m["num_tokens"]
    reader = open_cache(out, verify_hashes="none")
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        for i in range(len(reader)):
            reader[i]
    read_s = (time.perf_counter() - t0) / reps
    fid = m["stats"].get("fidelity")
    if fid is not None:
        mean_kl, max_kl, kept = fid["mean_kl"], fid["max_kl"], fid["mean_kept_ids"]
    else:
        kls = np.concatenate([row_kl(x, reader[i], TEMPS) for i, x in enumerate(derived)])
        mean_kl, max_kl, kept = kls.mean(0).tolist(), kls.max(0).tolist(), float(k)
    return {"bytes_per_supervised_token": m["stats"]["shard_bytes"] / n_sup,
            "mean_kl_T1": mean_kl[0], "mean_kl_T2": mean_kl[1],
            "max_kl_T1": max_kl[0], "max_kl_T2": max_kl[1],
            "mean_ids_kept": kept, "write_supervised_tok_per_s": n_sup / write_s,
            "read_supervised_tok_per_s": n_sup / read_s, "read_tok_per_s": n_tok / read_s,
            "supervised_tokens": n_sup, "tokens": n_tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", action="append", required=True, metavar="NAME=DIR[@DATASET]",
                    help="A teacher folder (save_pretrained) to measure, e.g. gsm8k=/tmp/gsm8k-teacher; "
                         "@DATASET: its own GSM8K-format .jsonl (default --dataset).")
    ap.add_argument("--tokenizer", default=None, help="Tokenizer (default: each teacher's own folder).")
    ap.add_argument("--dataset", default=str(SHARED / "data" / "gsm8k" / "train.jsonl"))
    ap.add_argument("--limit", type=int, default=48, help="Sequences per teacher.")
    ap.add_argument("--per-unit", type=int, default=16, help="Sequences per shard.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cache_encodings.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train = json.loads((ROOT / "bench" / "results" / "train.json").read_text())["results"]
    step_tok_per_s = max(train["cache"]["tokens_per_s"], train["cache_compact"]["tokens_per_s"])
    results = {"benchmark": "cache_encodings",
               "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": 2},
               "date": time.strftime("%Y-%m-%d"), "published": PUBLISHED,
               "training_step_tokens_per_s": step_tok_per_s, "teachers": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-encodings-"))
    try:
        for spec in args.teacher:
            name, _, folder = spec.partition("=")
            folder, _, dataset = folder.partition("@")
            tok = load_tokenizer(args.tokenizer or folder)
            data = load_tokenized(tok, DataConfig(dataset=dataset or args.dataset, limit=args.limit * 2,
                                                  max_length=512))
            t0 = time.perf_counter()
            recs, s50, s12, info = teacher_rows(folder, tok, data, args.limit)
            info["teacher_seconds"] = time.perf_counter() - t0
            rows = {}
            for label, k, samples, kw in VARIANTS:
                rows[label] = measure(recs, info["vocab_size"], k, samples, kw, s50, s12, args.per_unit, tmp)
                r = rows[label]
                print(f"{name:6s} {label:40s} {r['bytes_per_supervised_token']:7.1f} B/tok  "
                      f"KL T1 {r['mean_kl_T1']:.1e} (max {r['max_kl_T1']:.1e}) T2 {r['mean_kl_T2']:.1e}  "
                      f"kept {r['mean_ids_kept']:5.1f}  write {r['write_supervised_tok_per_s']:9.0f}  "
                      f"read {r['read_supervised_tok_per_s']:9.0f} sup tok/s", flush=True)
            results["teachers"][name] = {"teacher": folder, "dataset": dataset or args.dataset, **info,
                                         "variants": rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
