"""The checks only a GPU can make, in one run sized for a short device lease (a few minutes on one H100).

    python bench/gpu_check.py [--out bench/results/gpu.json] [--quick] [--device cuda] [--skip-stage-one]

1. Student training step (the trainer's loss path, as in ``bench_student.py``) on the device: reference vs
   fast path at both research configs (d=256/W=32/T=256 batch 8; d=512/W=512/T=128 batches 2 and 8), in fp32,
   bf16 autocast and fp16 autocast. Records step time, peak device memory over the timed steps, whether the
   loss and every gradient stay finite, and the loss's relative difference to fp32.
2. The conv1d / block-FFT crossover of the fast mixing layer on this device: forward + backward of one layer,
   kernel given. From the table it suggests ``FFT_CROSSOVER[device]`` for ``student/stft.py``: the
   smallest effective window L from which the FFT route won every measured case.
3. Stage one on a random Qwen2-0.5B-shaped teacher in bf16: ``bench_teacher_cache.py --config qwen2-0.5b``.
   It needs the Qwen2 tokenizer and GSM8K under ``$FNET_SHARED`` (default ``../shared``). Its JSON lands
   beside ``--out`` as ``teacher_cache_<device>.json``.
4. The teacher writing solutions on the same teacher shape: ``bench_write.py --model qwen2-0.5b`` (this
   project's batched sampler against ``model.generate()``, at batch 1, 32 questions and the default
   ``--write-batch``), into ``write_<device>.json`` beside ``--out``.

Each section is written to ``--out`` as soon as it finishes, so a run cut short keeps what it measured.
``--quick`` runs tiny sizes (also on CPU) to check that the script works.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench_student import (  # noqa: E402  (this folder)
    bench_crossover,
    fwd_bwd_seconds,
    make_model,
    median,
    set_mixer,
)

from cache.util import atomic_write_json  # noqa: E402

AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed_steps(model, ids: torch.Tensor, amp: str, reps: int, warmup: int) -> dict:
    """``fwd_bwd_seconds`` of ``bench_student.py`` under ``amp``, plus whether the last loss and every
    gradient are finite."""
    times, peak, loss = fwd_bwd_seconds(model, ids, reps, warmup, AMP[amp])
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {"s": median(times), "s_all": times, "peak_MiB": peak, "loss": loss,
            "loss_finite": math.isfinite(loss), "grads_finite": grads_finite}


def student_section(device: torch.device, quick: bool) -> list[dict]:
    configs = ([("quick", 32, 2, 64, 8, 32, [2])] if quick else
               [("d256-W32-T256", 256, 4, 1024, 32, 256, [8]),
                ("d512-W512-T128", 512, 4, 256, 512, 128, [2, 8])])
    rows = []
    for name, d, layers, ffn, W, T, batches in configs:
        model = make_model(d, layers, ffn, W, max_pos=max(T, 8)).to(device).train()
        for B in batches:
            ids = torch.randint(0, model.config.vocab_size, (B, T), device=device)
            row: dict = {"config": name, "batch": B, "d": d, "W": W, "T": T}
            for amp in AMP:
                kinds = ("reference", "auto", "conv", "fft") if amp == "fp32" else ("reference", "auto")
                for kind in kinds:
                    set_mixer(model, kind)
                    try:
                        r = timed_steps(model, ids, amp, reps=3 if kind == "reference" else 5, warmup=1)
                    except RuntimeError as e:  # e.g. CUDA out of memory, or an op without this dtype
                        r = {"error": str(e).splitlines()[0][:300]}
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    row[f"{kind}_{amp}"] = r
                    print(name, B, amp, kind, {k: v for k, v in r.items() if k != "s_all"}, flush=True)
                ref, fast = row[f"reference_{amp}"], row[f"auto_{amp}"]
                if "s" in ref and "s" in fast:
                    row[f"speedup_{amp}"] = ref["s"] / fast["s"]
                if amp != "fp32" and "loss" in fast and "loss" in row["auto_fp32"]:
                    row[f"loss_rel_diff_{amp}"] = abs(fast["loss"] - row["auto_fp32"]["loss"]) / abs(
                        row["auto_fp32"]["loss"])
            rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def crossover_section(device: torch.device, quick: bool) -> dict:
    grid = ([(32, 2, 64, [4, 16, 32])] if quick else
            [(256, 8, 256, [8, 16, 32, 64, 128, 256]), (256, 1, 128, [16, 32, 64, 128]),
             (512, 2, 128, [16, 32, 64, 128]), (512, 8, 512, [32, 64, 128, 256, 512])])
    rows = [row for d, B, T, lengths in grid for row in bench_crossover(d, B, T, lengths, device)]
    for row in rows:
        row["winner"] = "fft" if row["fft_s"] < row["conv_s"] else "conv"
    suggested = None
    for L in sorted({r["L"] for r in rows}):
        # the smallest L from which the FFT route won every measured case with at least 256 tokens
        if all(r["winner"] == "fft" for r in rows if r["L"] >= L and r["B"] * r["T"] >= 256):
            suggested = L
            break
    return {"rows": rows, "suggested_FFT_CROSSOVER": suggested}


def stage_one_section(device: torch.device, out: Path, quick: bool) -> dict:
    shared = Path(os.environ.get("FNET_SHARED", REPO.parent / "shared"))
    needed = (shared / "tokenizers" / "qwen2", shared / "data" / "gsm8k" / "train.jsonl")
    if not all(p.exists() for p in needed):
        return {"skipped": f"needs the Qwen2 tokenizer and GSM8K under {shared} (set FNET_SHARED)"}
    target = out.parent / f"teacher_cache_{device.type}.json"
    cmd = [sys.executable, str(HERE / "bench_teacher_cache.py"), "--device", str(device),
           "--out", str(target), "--config"]
    cmd += ["tiny"] if quick else ["qwen2-0.5b", "--seqs", "256", "--batch-tokens", "16384"]
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env={**os.environ, "FNET_SHARED": str(shared)})
    return {"command": " ".join(cmd[1:]), "exit": rc, "seconds": time.perf_counter() - t0,
            "results": str(target) if rc == 0 else None}


def write_section(device: torch.device, out: Path, quick: bool) -> dict:
    """The teacher writing (``bench_write.py``): this project's sampler against ``model.generate()`` on a
    random Qwen2-0.5B-shaped teacher (its solutions never end, so every one runs to the token limit: the
    worst case)."""
    shared = Path(os.environ.get("FNET_SHARED", REPO.parent / "shared"))
    if not (shared / "tokenizers" / "qwen2").exists():
        return {"skipped": f"needs the Qwen2 tokenizer and GSM8K under {shared} (set FNET_SHARED)"}
    target = out.parent / f"write_{device.type}.json"
    cmd = [sys.executable, str(HERE / "bench_write.py"), "--device", str(device), "--out", str(target)]
    cmd += (["--model", "qwen2-small", "--questions", "16", "--max-new-tokens", "16"] if quick else
            ["--model", "qwen2-0.5b", "--questions", "128", "--max-new-tokens", "256"])
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env={**os.environ, "FNET_SHARED": str(shared)})
    return {"command": " ".join(cmd[1:]), "exit": rc, "seconds": time.perf_counter() - t0,
            "results": str(target) if rc == 0 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json", help="where the JSON goes")
    ap.add_argument("--device", default="cuda", help="torch device to measure (default cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the script runs")
    ap.add_argument("--skip-stage-one", action="store_true", help="leave out the Qwen2-0.5B stage-one run")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: no CUDA device visible to torch {torch.__version__}; run this on a GPU machine, or "
              "pass --device cpu --quick to check the script", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    res: dict = {"device": name,
                 "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    t0 = time.perf_counter()
    res["student"] = student_section(device, args.quick)
    atomic_write_json(args.out, res)
    res["crossover"] = crossover_section(device, args.quick)
    atomic_write_json(args.out, res)
    if not args.skip_stage_one:
        res["stage_one"] = stage_one_section(device, args.out, args.quick)
        atomic_write_json(args.out, res)
        res["write"] = write_section(device, args.out, args.quick)
    res["total_s"] = time.perf_counter() - t0
    atomic_write_json(args.out, res)
    print("wrote", args.out, f"in {res['total_s']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
