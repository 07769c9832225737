"""Training throughput with decoded cache records kept in memory (``--record-cache-mb``, default 512)
against decoding every record at every read (``--record-cache-mb 0``), on the demo's student and a compact
(default encoding) top-32 cache of the demo teacher. Writes bench/results/record_cache.json.

The two settings train the same student on the same batches (results are bit-identical, tests/test_train.py);
only the time differs. They alternate, ``--repeats`` times each, in this process with one torch thread; the
table gives the median steps/s of the timed steps (the first epoch, which decodes every record in both
settings, is excluded by timing only the steps after it).

    python bench/bench_record_cache.py [--steps 240] [--repeats 2] [--out /tmp/bench-record-cache]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=240, help="Optimizer steps per run (default 240).")
    ap.add_argument("--repeats", type=int, default=2, help="Runs per setting, alternating (default 2).")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-record-cache"),
                    help="Scratch folder for the assets, the cache and the runs.")
    args, _ = ap.parse_known_args(argv)  # make bench passes its extra arguments to every script
    import torch

    from cache.device import machine_info
    from pipeline.demo.assets import build_demo_assets
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
    from student.train import TrainConfig, TrainHooks, train_student

    torch.set_num_threads(1)
    out = args.out.resolve()
    assets = build_demo_assets(out / "assets", scale=0.5)
    cache = out / "cache"
    run_teacher_cache(TeacherCacheConfig(teacher=str(assets.teacher_dir), dataset=str(assets.train_jsonl),
                                         out=cache, topk=32, temperatures=(1.0,), device="cpu",
                                         max_length=256, overflow="truncate", progress=False))
    man = json.loads((cache / "manifest.json").read_text())
    rates: dict[int, list[float]] = {512: [], 0: []}
    for rep in range(args.repeats):
        for mb in (0, 512):
            run = out / f"run-{mb}-{rep}"
            shutil.rmtree(run, ignore_errors=True)
            stamps: list[float] = []
            cfg = TrainConfig(cache=cache, out=run, hidden_size=32, layers=3, ffn=128, window=32,
                              max_positions=256, steps=args.steps, batch_tokens=2048, lr=6e-3, min_lr=6e-4,
                              warmup=30, alpha=0.2, temperature=1.0, kd="topk_tail", eval_every=0,
                              save_every=0, log_every=args.steps, seed=0, device="cpu", num_workers=0,
                              progress=False, record_cache_mb=mb)
            train_student(cfg, TrainHooks(after_step=lambda step: stamps.append(time.perf_counter())))
            skip = min(len(stamps) // 3, 40)  # past the first epoch (about 23 steps of 500 problems)
            timed = stamps[skip:]
            rates[mb].append((len(timed) - 1) / (timed[-1] - timed[0]))
            print(f"record-cache-mb {mb:4d}, run {rep}: {rates[mb][-1]:.2f} steps/s", flush=True)
    kept, none = statistics.median(rates[512]), statistics.median(rates[0])
    result = {"benchmark": "record_cache", "student": "d=32, 3 layers, FFN 128, W=32, 2048 tokens/step",
              "cache": {"encoding": man["settings"].get("encoding"), "topk": 32,
                        "sequences": man["num_sequences"],
                        "bytes_per_supervised_token": man["stats"]["bytes_per_supervised_token"]},
              "steps": args.steps, "repeats": args.repeats, "steps_per_s": {"kept_512mb": rates[512],
                                                                             "decode_every_read": rates[0]},
              "median_kept": kept, "median_decode": none, "speedup": kept / none,
              "machine": machine_info(),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "record_cache.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"decoded records kept: {kept:.2f} steps/s; decoded at every read: {none:.2f} steps/s; "
          f"{kept / none:.2f}x")
    return result


if __name__ == "__main__":
    main()
