"""Stage-one throughput and footprint (not a test). Writes bench/results/teacher_cache.json.

Compares, on the same length-sorted token-budget batches of chat-formatted GSM8K:
  bare      the teacher's plain forward pass (``model(...).logits``, full head on every position)
  stage1    the real stage-one loop: hidden states, chunked head + fp32 log-softmax + top-k/tail (+ samples)
            at supervised positions, shards written with CacheWriter (top-64, then top-64 + samples=50)
  naive     full forward, full fp32 log-softmax, full-vocabulary fp16 rows of supervised positions saved
            per example with np.save

``--config tiny`` (default, seconds) or ``--config qwen2-0.5b`` (random weights, Qwen2-0.5B's exact shape).
Peak memory on CPU is the process's peak RSS after each phase (monotonic); on CUDA it is
``torch.cuda.max_memory_allocated`` per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache.schema import CacheSettings  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402
from pipeline.data import load_examples, load_tokenizer, tokenize_examples  # noqa: E402
from pipeline.teacher import TargetSettings, Teacher, token_budget_batches  # noqa: E402
from pipeline.teacher_cache import unit_records  # noqa: E402

SHARED = Path(os.environ.get("FNET_SHARED", REPO.parent / "shared"))
CONFIGS = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
    "qwen2-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1_000_000.0,
                   "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
}


def build_model(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151_936, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                      pad_token_id=151643, **CONFIGS[name])
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def padded(seqs, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, L)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.from_numpy(s.input_ids.astype(np.int64))
        attn[b, : len(s)] = 1
    return ids.to(device), attn.to(device)


@torch.inference_mode()
def bare_forward(model, batches, pad_id: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for seqs in batches:
        ids, attn = padded(seqs, pad_id, device)
        model(input_ids=ids, attention_mask=attn, use_cache=False).logits.float().sum().item()
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def naive(model, batches, pad_id: int, device: torch.device, out: Path) -> tuple[float, int]:
    sync(device)
    t0 = time.perf_counter()
    for seqs in batches:
        ids, attn = padded(seqs, pad_id, device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, L, V)
        logp = torch.log_softmax(logits.float(), -1)
        for b, s in enumerate(seqs):
            rows = logp[b, np.flatnonzero(s.loss_mask) - 1].to(torch.float16).cpu().numpy()  # (n, V)
            np.save(out / f"seq-{s.seq_id:06d}.npy", rows)
    sync(device)
    return time.perf_counter() - t0, sum(p.stat().st_size for p in out.iterdir())


def stage_one(teacher: Teacher, units, settings: TargetSettings, pad_id: int, batch_tokens: int,
              out: Path) -> tuple[float, int]:
    cs = CacheSettings(topk=settings.topk, vocab_size=teacher.vocab_size, samples=settings.samples,
                       temperatures=settings.temperatures, dtype=settings.logprob_dtype)
    writer = CacheWriter(out, {"bench": True}, cs)
    try:
        sync(teacher.device)
        t0 = time.perf_counter()
        for u, seqs in enumerate(units):
            writer.write_unit(u, unit_records(teacher, seqs, settings, pad_id, batch_tokens))
        sync(teacher.device)
        wall = time.perf_counter() - t0
    finally:
        writer.close()
    return wall, sum(p.stat().st_size for p in out.glob("unit-*"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--seqs", type=int, default=None, help="GSM8K rows (default 32 tiny, 8 qwen2-0.5b)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default 2048 tiny, 1024 qwen2-0.5b")
    ap.add_argument("--unit-size", type=int, default=16)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "teacher_cache.json")
    args, _ = ap.parse_known_args(argv)
    small = args.config == "tiny"
    n_rows = args.seqs or (32 if small else 8)
    batch_tokens = args.batch_tokens or (2048 if small else 1024)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]

    tok_dir = SHARED / "tokenizers" / "qwen2"
    data_file = SHARED / "data" / "gsm8k" / "train.jsonl"
    if not tok_dir.exists() or not data_file.exists():
        raise SystemExit(f"needs the Qwen2 tokenizer and GSM8K under {SHARED}")
    tokenizer = load_tokenizer(str(tok_dir))
    examples = load_examples(str(data_file), limit=n_rows)
    data = tokenize_examples(tokenizer, examples, max_length=args.max_length, overflow="truncate")
    seqs, pad_id = data.seqs, tokenizer.pad_token_id
    units = [seqs[i: i + args.unit_size] for i in range(0, len(seqs), args.unit_size)]
    batches = [[u[i] for i in b]
               for u in units for b in token_budget_batches([len(s) for s in u], batch_tokens)]
    n_tok, n_sup = data.num_tokens, data.num_supervised

    t0 = time.perf_counter()
    model = build_model(args.config, device, dtype)
    build_s = time.perf_counter() - t0
    teacher = Teacher(model, {"kind": "bench"}, 151_936, device, dtype)
    bare_forward(model, batches[-1:], pad_id, device)  # warm-up

    results: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    try:
        reset_peak(device)
        wall = bare_forward(model, batches, pad_id, device)
        results["bare_forward"] = {"seconds": wall, "tokens_per_second": n_tok / wall,
                                   "peak_memory_mb": peak_memory_mb(device)}
        for name, samples in (("stage1_top64", 0), (f"stage1_top64_samples{args.samples}", args.samples)):
            reset_peak(device)
            settings = TargetSettings(topk=args.topk, samples=samples, logprob_dtype="float16")
            wall, nbytes = stage_one(teacher, units, settings, pad_id, batch_tokens, tmp / name)
            results[name] = {"seconds": wall, "tokens_per_second": n_tok / wall,
                             "overhead_vs_bare": wall / results["bare_forward"]["seconds"] - 1,
                             "bytes": nbytes, "bytes_per_token": nbytes / n_tok,
                             "bytes_per_supervised_token": nbytes / n_sup,
                             "peak_memory_mb": peak_memory_mb(device)}
        reset_peak(device)
        (tmp / "naive").mkdir()
        wall, nbytes = naive(model, batches, pad_id, device, tmp / "naive")
        results["naive_full_logits_fp16"] = {
            "seconds": wall, "tokens_per_second": n_tok / wall,
            "overhead_vs_bare": wall / results["bare_forward"]["seconds"] - 1, "bytes": nbytes,
            "bytes_per_token": nbytes / n_tok, "bytes_per_supervised_token": nbytes / n_sup,
            "peak_memory_mb": peak_memory_mb(device)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "config": args.config, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__},
        "sequences": len(seqs), "tokens": n_tok, "supervised_tokens": n_sup, "batch_tokens": batch_tokens,
        "batches": len(batches), "topk": args.topk, "samples": args.samples, "model_build_seconds": build_s,
        "peak_memory_note": "CPU: process peak RSS after each phase (monotonic); "
                            "CUDA: per-phase max allocated",
        "results": results,
    }
    key = f"{args.config}/{device.type}"
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    old[key] = report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from cache.util import atomic_write_json

    atomic_write_json(args.out, old)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
