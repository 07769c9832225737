"""Where a demo student's training step goes: the demo's student and budget on the demo's own caches, one
thread, each part of ``student.train``'s step timed on its own. Writes bench/results/demo_step.json.

Parts, in the order a step runs them (``student.step.accumulate`` and ``optimizer_step``):
  data      the loader's next micro-batch (read, decode unless the record is kept, collate)
  kernels   each STFT layer's kernel for the step (``shared_kernels`` entry)
  forward   the student's forward pass and the chunked distillation loss (``run.forward``)
  backward  ``loss.backward()``
  grads     the kernel gradients mapped back to the projection weights (``shared_kernels`` exit)
  optimizer gradient clipping and the AdamW step
The project's own step (``accumulate`` + ``optimizer_step``, no timers) gives the step time the parts should
add up to. Runs on references (the demo's KD run) and on references + teacher-written solutions (its
written-data run), each in a fresh process.

Needs the demo's folder (``make demo``):

    python bench/bench_demo_step.py [--demo runs/demo] [--steps 500] [--warmup 100]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("data", "kernels", "forward", "backward", "grads", "optimizer")


def measure(demo: Path, method: str, steps: int, warmup: int) -> dict:
    """One run's part times (ms per step, mean over ``steps`` after ``warmup``), in this process."""
    sys.path.insert(0, str(ROOT))
    import torch

    from pipeline.demo.config import DemoConfig
    from student.losses import LossSums, combine_loss
    from student.setup import setup
    from student.step import accumulate, optimizer_step, targets_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    budget = DemoConfig(out=demo).resolved_student()
    out = Path(tempfile.mkdtemp(prefix="bench-demo-step-"))
    mix = (demo / "cache-written",) if method == "kdw" else ()
    cfg = budget.train_config(cache=demo / "cache-train", mix_caches=mix, val_cache=demo / "cache-test",
                              out=out / "run", alpha=budget.alpha, eval_every=0, save_every=0, seed=0,
                              device="cpu", num_workers=0, progress=False)
    run = setup(cfg)
    lc = cfg.loss_config()

    def batches():
        epoch = 0
        while True:
            run.sampler.set_epoch(epoch, 0)
            loader = iter(run.loader)
            for plan in run.sampler.steps():
                yield plan, loader
            epoch += 1

    def real_step(plan, loader) -> None:
        accumulate(run, [next(loader).to(run.device)], plan.num_supervised)
        optimizer_step(run)
        run.state.step += 1

    def step(plan, loader, clock: dict | None):
        marks = [time.perf_counter()]

        def mark():
            if clock is not None:
                marks.append(time.perf_counter())

        batch = next(loader).to(run.device)
        mark()
        kernels = run.model.shared_kernels(int(batch.input_ids.shape[1]))
        kernels.__enter__()
        mark()
        targets = targets_for(run, batch, run.data.temp_index)
        ce, kd, agree, correct = run.forward(batch.input_ids, batch.attention_mask, batch.pred_pos, targets)
        loss = combine_loss(LossSums(ce, kd, batch.num_supervised, agree, correct), alpha=lc.alpha,
                            temperature=lc.temperature, normalizer=plan.num_supervised)
        mark()
        loss.backward()
        mark()
        kernels.__exit__(None, None, None)
        mark()
        optimizer_step(run)
        run.state.step += 1
        mark()
        if clock is not None:
            for name, a, b in zip(PARTS, marks, marks[1:]):
                clock[name] = clock.get(name, 0.0) + (b - a)

    try:
        it = batches()
        for _ in range(warmup):
            step(*next(it), None)
        clock: dict[str, float] = {}
        t0 = time.perf_counter()
        for _ in range(steps):
            step(*next(it), clock)
        timed = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            real_step(*next(it))
        plain = time.perf_counter() - t0
    finally:
        run.close()
        shutil.rmtree(out, ignore_errors=True)
        torch.set_num_threads(threads)
    return {"method": method, "steps": steps, "warmup": warmup, "batch_tokens": cfg.batch_tokens,
            "ms_per_step": {k: 1e3 * v / steps for k, v in clock.items()},
            "ms_per_step_timed_total": 1e3 * timed / steps, "ms_per_step_untimed": 1e3 * plain / steps,
            "kept_record_mb": cfg.record_cache_mb}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo",
                    help="the demo's folder (make demo): its cache-train, cache-test and cache-written are "
                    "read")
    ap.add_argument("--steps", type=int, default=500, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=100, help="untimed steps before them")
    ap.add_argument("--method", choices=["kd", "kdw"], help=argparse.SUPPRESS)  # one run, in this process
    args = ap.parse_args()
    if args.method:
        print(json.dumps(measure(args.demo.resolve(), args.method, args.steps, args.warmup)))
        return 0
    missing = [c for c in ("cache-train", "cache-test", "cache-written")
               if not (args.demo / c / "manifest.json").is_file()]
    if missing:
        print(f"bench_demo_step: {args.demo} has no {', '.join(missing)}; run `make demo` first (skipped)")
        return 0
    runs = []
    for method in ("kd", "kdw"):
        cmd = [sys.executable, __file__, "--demo", str(args.demo), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--method", method]
        runs.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        r = runs[-1]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_step"].items())
        print(f"{method}: {r['ms_per_step_untimed']:.2f} ms per step untimed, "
              f"{r['ms_per_step_timed_total']:.2f} timed ({parts} ms)", flush=True)
    import torch

    result = {"bench": "demo_step", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": 1},
              "runs": runs}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "demo_step.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
