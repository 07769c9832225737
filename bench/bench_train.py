"""Stage two from the cache vs the research approach (teacher forward inside every step), and data-loader
headroom. Writes bench/results/train.json.

Same student (the default: d=256, 4 layers, FFN 1024, W=32, full 151,936-row vocabulary), same micro-batches,
same loss code (student.train.accumulate + optimizer_step):
  (a) cache:   targets (top-k + tail) read from a teacher cache;
  (b) teacher: a randomly initialised Qwen2ForCausalLM with Qwen2-0.5B's config runs forward on every
               micro-batch and the same top-k + tail targets are built from its logits.
Each runs in its own process (peak RSS is per process). The loader is timed alone over the same cache.

    python bench/bench_train.py [--sequences 48] [--batch-tokens 1024] [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VOCAB = 151_936
QWEN2_05B = dict(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_cache(path: Path, n: int, seed: int = 0, id_pool: int | None = None) -> None:
    """GSM8K-shaped synthetic cache: ~100 prompt + ~150 answer tokens, k=64, T=(1, 2), fp16 log-probs.
    ``id_pool``: draw every id from a fixed random subset of that many ids (what --compact-vocab keeps)."""
    from cache.schema import CacheRecord, CacheSettings
    from cache.writer import CacheWriter

    rng = np.random.default_rng(seed)
    pool = np.sort(rng.choice(151_643, id_pool, replace=False)) if id_pool else None

    def draw(shape):
        return (pool[rng.integers(0, len(pool), shape)] if pool is not None
                else rng.integers(0, 151_643, shape)).astype(np.int32)

    s = CacheSettings(topk=64, vocab_size=VOCAB, temperatures=(1.0, 2.0), dtype="float16")
    recs = []
    for i in range(n):
        prompt, ans = int(np.clip(rng.normal(100, 20), 40, 160)), int(np.clip(rng.normal(150, 30), 60, 220))
        L = prompt + ans
        mask = np.zeros(L, dtype=bool)
        mask[prompt:] = True
        lp = -np.sort(rng.exponential(2.0, size=(ans, 64)), axis=1)
        recs.append(CacheRecord(
            seq_id=i, input_ids=draw(L), loss_mask=mask, assistant_start=prompt, topk_ids=draw((ans, 64)),
            topk_logprobs=lp.astype(np.float16), topk_shift=rng.normal(size=(ans, 2)).astype(np.float32),
            tail_mass=rng.random((ans, 2), dtype=np.float32) * 0.1))
    with CacheWriter(path, fingerprint={"bench": "train"}, settings=s) as w:
        w.write_unit(0, recs)
        w.finalize(1, tokenizer={"vocab_size": 151_646, "eos_token_id": 151_645, "pad_token_id": 151_643})


def teacher_targets(teacher, batch, temps=(1.0, 2.0), k: int = 64):
    """Replace the batch's cached targets with ones computed from the live teacher (the research loop)."""
    import torch

    with torch.no_grad():
        mask = batch.attention_mask.long()
        logits = teacher(input_ids=batch.input_ids, attention_mask=mask).logits  # (B, L, V)
        z = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.pred_pos).float()  # (N, V)
        lse1 = torch.logsumexp(z, -1)
        top = torch.topk(z, k, dim=-1)
        shifts, tails = [], []
        for T in temps:
            lseT = torch.logsumexp(z / T, -1)
            shifts.append(lse1 / T - lseT)
            tails.append((1 - torch.exp(top.values / T - lseT[:, None]).sum(-1)).clamp(0, 1))
    batch.topk_ids = top.indices
    batch.topk_logprobs = top.values - lse1[:, None]
    batch.topk_shift = torch.stack(shifts, 1)
    batch.tail_mass = torch.stack(tails, 1)
    return batch


def run_mode(mode: str, cache: Path, batch_tokens: int, steps: int, threads: int, compact: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    from student.train import TrainConfig, accumulate, optimizer_step, setup

    rss0 = rss_mib()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(cache=cache, out=Path(out) / "run", steps=100, batch_tokens=batch_tokens, accum=1,
                          num_workers=0, progress=False, device="cpu", precision="fp32", chunk_size=256,
                          compact_vocab=compact)
        run = setup(cfg)
        teacher = None
        if mode == "teacher":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            torch.manual_seed(0)
            teacher = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B)).eval()
        rss_model = rss_mib()
        run.sampler.set_epoch(0)
        batches = iter(run.loader)
        times, teacher_times, tokens = [], [], []
        for i, plan in enumerate(run.sampler.steps()[: steps + 1]):
            t0 = time.perf_counter()
            micro = [next(batches) for _ in plan.micro_batches]
            if teacher is not None:
                micro = [teacher_targets(teacher, b) for b in micro]
            t1 = time.perf_counter()
            accumulate(run, micro, plan.num_supervised)
            optimizer_step(run)
            run.state.step += 1
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t0)
                teacher_times.append(t1 - t0)
                tokens.append(sum(int(b.attention_mask.sum()) for b in micro))
    teacher_params = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    return {"mode": mode, "student_vocab": run.model.config.vocab_size, "s_per_step": float(np.mean(times)),
            "steps_per_s": 1 / float(np.mean(times)),
            "tokens_per_step": float(np.mean(tokens)), "tokens_per_s": float(np.sum(tokens) / np.sum(times)),
            "load_or_teacher_s_per_step": float(np.mean(teacher_times)),
            "measured_steps": len(times), "rss_after_imports_mib": rss0, "rss_after_models_mib": rss_model,
            "peak_rss_mib": peak_rss_mib(), "teacher_params": teacher_params}


def loader_throughput(cache: Path, batch_tokens: int, workers: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from cache.reader import open_cache
    from student.data import CacheDataset, Collator, TokenBudgetBatchSampler, make_dataloader

    reader = open_cache(cache)
    ds = CacheDataset(reader)
    sampler = TokenBudgetBatchSampler.from_dataset(ds, batch_tokens, seed=0)
    loader = make_dataloader(ds, sampler, Collator.from_reader(reader), num_workers=workers,
                             persistent_workers=True)
    tok, t0, epochs = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < 10.0 or epochs < 2:
        sampler.set_epoch(epochs)
        for b in loader:
            tok += int(b.attention_mask.sum())
        epochs += 1
    dt = time.perf_counter() - t0
    return {"workers": workers, "tokens_per_s": tok / dt, "epochs": epochs, "seconds": dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per mode (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compact-ids", type=int, default=40_000,
                    help="also time (a) with --compact-vocab on a cache whose ids come from this many ids")
    ap.add_argument("--compact", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["cache", "teacher", "loader"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode == "loader":
        print(json.dumps(loader_throughput(args.cache, args.batch_tokens, args.workers, args.threads)))
        return 0
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.cache, args.batch_tokens, args.steps, args.threads,
                                  args.compact)))
        return 0

    load_before = os.getloadavg()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        write_cache(cache, args.sequences)
        base = [sys.executable, __file__, "--cache", str(cache), "--batch-tokens", str(args.batch_tokens),
                "--steps", str(args.steps), "--threads", str(args.threads)]
        for mode in ("cache", "teacher"):
            out = subprocess.run(base + ["--mode", mode], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(mode, results[mode], flush=True)
        if args.compact_ids:
            small = Path(tmp) / "cache-compact"
            write_cache(small, args.sequences, id_pool=args.compact_ids)
            cmd = [*base, "--mode", "cache", "--compact"]
            cmd[cmd.index(str(cache))] = str(small)
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results["cache_compact"] = json.loads(out.stdout.strip().splitlines()[-1])
            print("cache_compact", results["cache_compact"], flush=True)
        results["loader"] = []
        for workers in (0, 2):
            out = subprocess.run(base + ["--mode", "loader", "--workers", str(workers)], capture_output=True,
                                 text=True, check=True)
            results["loader"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print("loader", results["loader"][-1], flush=True)
    a, b = results["cache"], results["teacher"]
    loader0 = results["loader"][0]["tokens_per_s"]
    summary = {
        "speedup_per_step_cache_vs_teacher": b["s_per_step"] / a["s_per_step"],
        "peak_rss_cache_mib": a["peak_rss_mib"], "peak_rss_teacher_mib": b["peak_rss_mib"],
        "extra_rss_teacher_mib": b["peak_rss_mib"] - a["peak_rss_mib"],
        "loader_headroom_workers0": loader0 / a["tokens_per_s"],
        "goal_speedup_3x_met": b["s_per_step"] / a["s_per_step"] >= 3,
        "goal_loader_headroom_10x_met": loader0 / a["tokens_per_s"] >= 10,
    }
    if "cache_compact" in results:
        c = results["cache_compact"]
        summary["speedup_teacher_vs_cache_compact"] = b["s_per_step"] / c["s_per_step"]
        summary["compact_vocab"] = c["student_vocab"]
    doc = {
        "benchmark": "train",
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "torch_threads": args.threads, "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                    "note": "shared 2-core CPU; other jobs ran at the same time (see loadavg)"},
        "config": {"sequences": args.sequences, "batch_tokens": args.batch_tokens, "accum": 1, "topk": 64,
                   "student": "d=256, 4 layers, FFN 1024, W=32, vocab 151936, fp32, chunk 256",
                   "teacher": "Qwen2ForCausalLM, Qwen2-0.5B config, random weights, fp32, no grad"},
        "results": results, "summary": summary,
    }
    (HERE / "results").mkdir(exist_ok=True)
    from cache.util import atomic_write_json

    atomic_write_json(HERE / "results" / "train.json", doc)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
