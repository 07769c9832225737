"""Time and peak memory of ``chunked_distill_loss`` forward + backward at the default student's head
(d=256, V=151,936), against the unchunked reference on full logits. Writes bench/results/losses.json.

Each configuration runs in its own process: the increase of peak RSS (VmHWM, reset once the inputs exist)
over the RSS at that point, and the best of ``--repeats`` forward + backward wall times.

    python bench/bench_losses.py [--rows 1024] [--chunks 1024,256,64] [--kinds topk_tail] [--threads 1]
    python bench/bench_losses.py --impl OLD_LOSSES.py --out before.json   # another losses.py, same inputs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from peak_rss import reset_peak_rss, status_mib  # this folder

HERE = Path(__file__).resolve().parent
VOCAB = 151_936


def load_losses(impl: str | None):
    """The loss functions under test: this repository's (``student.losses`` + ``student.chunked_loss``), or
    one file that defines them all (e.g. an older ``losses.py``)."""
    if impl is None:
        from types import SimpleNamespace

        import student.chunked_loss as chunked
        import student.losses as defs

        return SimpleNamespace(DistillTargets=defs.DistillTargets, distill_loss_sums=defs.distill_loss_sums,
                               combine_loss=defs.combine_loss,
                               chunked_distill_loss=chunked.chunked_distill_loss)
    spec = importlib.util.spec_from_file_location("losses_under_test", impl)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def run_one(args: argparse.Namespace, kind: str, chunk: int) -> dict:
    """chunk 0 = the unchunked reference (distill_loss_sums on hidden @ weight.T)."""
    import torch

    torch.set_num_threads(args.threads)
    losses = load_losses(args.impl)
    gen = torch.Generator().manual_seed(0)
    n, d, k = args.rows, args.hidden, args.topk
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(VOCAB, d, generator=gen) * 0.05
    logp, ids = torch.randn(n, k, generator=gen).sort(-1, descending=True)
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:k].clone() for _ in range(n)])
    sample_ids = ids[:, :16]
    sample_counts = torch.randint(0, 5, (n, 16), generator=gen).float()
    targets = losses.DistillTargets(
        labels=torch.randint(0, VOCAB, (n,), generator=gen), topk_ids=ids,
        topk_logprobs=(logp - 3.0).half(), shift=torch.randn(n, generator=gen) * 0.1,
        tail=torch.rand(n, generator=gen) * 0.2, sample_ids=sample_ids, sample_counts=sample_counts)
    rss0 = reset_peak_rss()  # the setup's freed pages handed back first
    times = []
    for _ in range(args.repeats):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        t0 = time.perf_counter()
        if chunk:
            extra = {"grad_weights": (0.5, 0.5 * args.temperature**2)} if args.grad_weights else {}
            sums = losses.chunked_distill_loss(h, w, targets, kind=kind, temperature=args.temperature,
                                               chunk_size=chunk, **extra)
        else:
            sums = losses.distill_loss_sums(h @ w.T, targets, kind, args.temperature)
        loss = losses.combine_loss(sums, alpha=0.5, temperature=args.temperature, normalizer=n)
        loss.backward()
        times.append(time.perf_counter() - t0)
        del h, w, sums, loss
    peak = status_mib("VmHWM")
    return {"kind": kind, "chunk": chunk or "unchunked", "rows": n, "best_s": min(times), "times_s": times,
            "peak_rss_increase_mib": peak - rss0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--chunks", default="0,1024,256,64", help="comma-separated; 0 = unchunked reference")
    ap.add_argument("--kinds", default="topk_tail")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grad-weights", action="store_true",
                    help="pass grad_weights=(alpha, (1 - alpha) T^2): gradients computed in forward")
    ap.add_argument("--impl", help="path of another losses.py to time instead of student.losses")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "losses.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, chunk = args.one.split(":")
        print(json.dumps(run_one(args, kind, int(chunk))))
        return 0
    load_before = os.getloadavg()
    results = []
    for kind in args.kinds.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            cmd = [sys.executable, __file__, "--one", f"{kind}:{chunk}", *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    doc = {
        "benchmark": "losses",
        "impl": args.impl or "student/losses.py", "grad_weights": args.grad_weights,
        "config": {"rows": args.rows, "hidden": args.hidden, "vocab": VOCAB, "topk": args.topk,
                   "temperature": args.temperature, "alpha": 0.5, "dtype": "float32",
                   "repeats": args.repeats},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "note": "shared 2-core CPU; other jobs ran at the same time (see loadavg)"},
        "results": results,
    }
    from cache.util import atomic_write_json

    atomic_write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
