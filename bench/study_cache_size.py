"""How small may the cache be? Students trained at equal budget from caches of every size, on the demo's
assets (its generated GSM8K-style problems, tokenizer and teacher), scored on the test split.

The teacher runs twice over the train split: once keeping its whole distribution (k = vocabulary, exact
float32, 50 Random-Sampling draws) and once for 12 draws. Every other train cache is derived from those
exact rows and written with the real ``CacheWriter`` (a smaller k keeps the first k ids and moves the rest's
exact mass into the tail), so the variants differ only in what they keep and how they encode it:

    ce                 CE on the labels only (alpha = 1)
    full               topk_tail on the whole distribution (the reference)
    tail-k{1,4,16,64}  topk_tail, exact encoding, and -compact with the compact encoding
    renorm-k16         topk_renorm at k = 16 (exact)
    rs12, rs50         sampled KD on 12 / 50 Random-Sampling draws (compact)
    top-p0.9-k32       topk_tail on the compact adaptive-k preset (--top-p 0.9 --topk 32)

Each variant trains ``--seeds`` students with the same steps, token budget, learning rate and alpha; the
table gives bytes per supervised token of its train cache against validation CE and KL (the trainer's own
evaluation on the full-distribution test cache) and exact-answer accuracy (greedy, strict) on the first
``--problems`` test problems, as mean and standard deviation over seeds; the picture plots the same.

    python bench/study_cache_size.py --out runs/study                   # make study (< 30 min on 2 cores)
    python bench/study_cache_size.py --out /tmp/study --quick           # a smoke run in about a minute

Students train ``--jobs`` at a time (default: one per usable core, at most 2), each in its own spawned
process with ``--threads`` torch threads (default 1); a line per finished student gives its metrics,
elapsed time and an ETA. Re-running reuses the assets and the caches and retrains every student.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.reader import open_cache  # noqa: E402
from cache.schema import CacheRecord, CacheSettings, FingerprintMismatch  # noqa: E402
from cache.util import UserError, atomic_write_bytes, lock_run_folder  # noqa: E402
from cache.writer import CacheWriter  # noqa: E402

TEMPS = (1.0, 2.0)
# name -> (train cache, kd kind, alpha); alpha 1.0 is CE only, None the study's --alpha
VARIANTS: dict[str, tuple[str, str, float | None]] = {
    "ce": ("full", "topk_tail", 1.0),
    "full": ("full", "topk_tail", None),
    "tail-k64": ("k64", "topk_tail", None),
    "tail-k64-compact": ("k64-compact", "topk_tail", None),
    "tail-k16": ("k16", "topk_tail", None),
    "tail-k16-compact": ("k16-compact", "topk_tail", None),
    "tail-k4": ("k4", "topk_tail", None),
    "tail-k4-compact": ("k4-compact", "topk_tail", None),
    "tail-k1": ("k1", "topk_tail", None),
    "tail-k1-compact": ("k1-compact", "topk_tail", None),
    "renorm-k16": ("k16", "topk_renorm", None),
    "rs12": ("rs12", "sampled", None),
    "rs50": ("rs50", "sampled", None),
    "top-p0.9-k32": ("top-p0.9-k32", "topk_tail", None),
}
QUICK_VARIANTS = ("ce", "tail-k4-compact", "rs12")
STEPS = 900  # per student: 40 epochs of the study's 500 training problems; 42 students fit 30 min on 2 cores
# The study's students take the demo's batch of the time it was measured (<= 2048 tokens per step), not the
# demo's current one, so that `make study` reruns the budget docs/study.md reports.
BATCH_TOKENS = 2048
PLOT_EVERY_S = 60.0  # study.png is redrawn at most this often (and at the end); the table after every student


def derive(rec: CacheRecord, k: int, samples: tuple | None) -> CacheRecord:
    """The record a top-``k`` teacher pass would have written: the first k ids, the rest's exact mass moved
    into the tail at every temperature; with ``samples`` (offsets, ids, counts) attached."""
    lp = rec.topk_logprobs.astype(np.float64)
    tail = rec.tail_mass.astype(np.float64).copy()
    for i, t in enumerate(TEMPS):
        tail[:, i] += np.exp(lp[:, k:] / t + rec.topk_shift[:, i:i + 1].astype(np.float64)).sum(1)
    out = CacheRecord(rec.seq_id, rec.input_ids, rec.loss_mask, rec.assistant_start,
                      rec.topk_ids[:, :k].copy(), rec.topk_logprobs[:, :k].copy(), rec.topk_shift.copy(),
                      np.minimum(tail, 1.0).astype(np.float32))
    if samples is not None:
        out.sample_offsets, out.sample_ids, out.sample_counts = samples
    return out


def write_variant(src: Path, rs12: Path, out: Path, name: str, vocab: int) -> dict[str, Any]:
    """One train cache derived from the full-distribution cache ``src`` (and the 12-draw cache)."""
    full = open_cache(src)
    if (out / "manifest.json").exists():  # reuse a variant derived from this very full cache
        m = json.loads((out / "manifest.json").read_text())
        if m["fingerprint"].get("study_source") == full.fingerprint_digest:
            return m
    compact = name.endswith("-compact") or name.startswith(("rs", "top-p"))
    k = {"rs12": 1, "rs50": 1, "top-p0.9-k32": 32}.get(name) or int(name.split("-")[0].removeprefix("k"))
    k = min(k, vocab)
    draws = open_cache(rs12) if name == "rs12" else full
    samples = draws.samples if name in ("rs12", "rs50") else 0
    s = CacheSettings(topk=k, vocab_size=vocab, samples=samples, temperatures=TEMPS, dtype="float32",
                      encoding="compact" if compact else "exact",
                      top_p=0.9 if name == "top-p0.9-k32" else None)
    fp = {**full.fingerprint, "study_variant": name, "study_source": full.fingerprint_digest, "topk": k,
          "samples": samples}
    shutil.rmtree(out, ignore_errors=True)
    with CacheWriter(out, fp, s) as w:
        units = np.searchsorted(np.asarray(full._starts), np.arange(len(full)), side="right") - 1
        for u in range(int(units.max()) + 1):
            recs = []
            for i in np.flatnonzero(units == u):
                r, d = full[int(i)], draws[int(i)] if samples else None
                extra = (d.sample_offsets, d.sample_ids, d.sample_counts) if samples else None
                recs.append(derive(r, k, extra))
            w.write_unit(u, recs)
        tok = full.manifest.get("tokenizer")
        att = {"tokenizer": full.tokenizer_dir} if full.tokenizer_dir is not None else {}
        return w.finalize(int(units.max()) + 1, attachments=att, tokenizer=tok)


def summarise(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def machine() -> dict[str, Any]:
    from cache.device import machine_info

    m = machine_info()
    return {"cpu": m["cpu_model"] or platform.machine(), "usable_cores": m["usable_cores"],
            "torch": m["torch"], "python": m["python"], "platform": m["platform"]}


def student_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train and score one student (in a worker process: its own torch thread count)."""
    import torch

    from pipeline.demo.budget import StudentBudget
    from pipeline.evaluate import evaluate_model
    from student.train import train_student

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    t0, cpu0 = time.time(), time.process_time()
    s = job["student"]
    sd = Path(job["out"])
    shutil.rmtree(sd, ignore_errors=True)
    cfg = StudentBudget.from_json(s).replace(steps=job["steps"]).train_config(
        cache=Path(job["cache"]), val_cache=Path(job["val_cache"]), out=sd,
        warmup=min(s["warmup"], max(1, job["steps"] // 2)), alpha=job["alpha"], kd=job["kd"], eval_every=0,
        save_every=0, log_every=max(1, job["steps"] // 4), seed=job["seed"], device="cpu", num_workers=0,
        progress=False)
    res = train_student(cfg)
    m = res.final_metrics
    acc = None
    if job["problems"]:
        acc = evaluate_model(res.out_dir / "final", job["data_dir"], "test", job["problems"],
                             max_new_tokens=job["max_new_tokens"], batch_size=50, device="cpu",
                             dtype="float32", progress=False)
    return {"variant": job["variant"], "seed": job["seed"], "val_ce": m.get("val_ce"),
            "val_kl": m.get("val_kl"), "val_top1": m.get("val_top1_agree"),
            "accuracy": None if acc is None else acc.strict_correct / max(acc.n, 1),
            "n": 0 if acc is None else acc.n, "train_wall_s": res.wall_s, "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - cpu0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pipeline.demo.budget import StudentBudget

    demo = StudentBudget()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="Working folder (assets, caches, students, results).")
    ap.add_argument("--assets", type=Path, default=None,
                    help="An existing demo assets folder to use (default: build or reuse OUT/assets).")
    ap.add_argument("--seeds", type=int, default=3, help="Students per variant: seeds 0, 1, ... (default 3).")
    ap.add_argument("--steps", type=int, default=STEPS,
                    help=f"Optimizer steps per student, the same for every variant (default {STEPS}).")
    ap.add_argument("--alpha", type=float, default=demo.alpha,
                    help=f"Label weight of every KD variant; CE only is alpha 1 (default {demo.alpha}, "
                         "the demo's).")
    ap.add_argument("--problems", type=int, default=300,
                    help="Test problems answered per student (greedy, strict exact answer; default 300, "
                         "the whole test split); 0 skips.")
    ap.add_argument("--max-new-tokens", type=int, default=64,
                    help="Generation budget per problem (default 64).")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="Comma-separated subset of the variants (default: all 14).")
    ap.add_argument("--jobs", type=int, default=None,
                    help="Students trained at the same time, one process each (default: one per usable "
                         "core, at most 2; 1 trains them one after the other in this process).")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per process (default 1; 0: torch's default).")
    ap.add_argument("--quick", action="store_true", help="Tiny assets, 3 variants, 1 seed, a few steps.")
    args = ap.parse_args(argv)
    from pipeline.demo.assets import build_demo_assets
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    variants = QUICK_VARIANTS if args.quick else tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.seeds < 1 or args.steps < 1 or args.problems < 0:
        raise UserError("--seeds and --steps must be >= 1 and --problems >= 0")
    seeds = 1 if args.quick else args.seeds
    steps = 4 if args.quick else args.steps
    problems = min(args.problems, 4) if args.quick else args.problems
    host = machine()
    jobs = args.jobs if args.jobs is not None else max(1, min(2, host["usable_cores"] or 1))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    lock = lock_run_folder(out, "study")  # one study per folder; released when this process ends
    t0 = time.time()
    load_start = os.getloadavg()
    if args.assets is not None:
        from pipeline.demo.assets import DemoAssets

        a = args.assets
        assets = DemoAssets(a / "data" / "train.jsonl", a / "data" / "test.jsonl", a / "tokenizer",
                            a / "teacher", {})
    else:
        assets = build_demo_assets(out / "assets", scale=0.05 if args.quick else 1.0, tiny=args.quick,
                                   log=print)
    common = dict(teacher=str(assets.teacher_dir), temperatures=TEMPS, encoding="exact",
                  logprob_dtype="float32", device="cpu", progress=False, unit_size=64,
                  max_length=256, overflow="truncate")
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(assets.teacher_dir).vocab_size)
    caches = out / "caches"
    for split, path, samples, seed, name in (("train", assets.train_jsonl, 50, 0, "full"),
                                             ("train", assets.train_jsonl, 12, 1, "rs12-draws"),
                                             ("test", assets.test_jsonl, 0, 0, "val")):
        tc = TeacherCacheConfig(dataset=str(path), split=split, out=caches / name,
                                topk=vocab if name != "rs12-draws" else 1, samples=samples, seed=seed,
                                **common)
        try:
            run_teacher_cache(tc)  # resumes, or reuses a finished cache of the same fingerprint
        except FingerprintMismatch:  # assets of other settings (e.g. a new generator): rebuild
            shutil.rmtree(caches / name)
            run_teacher_cache(tc)
    bytes_per = {"full": json.loads((caches / "full" / "manifest.json").read_text())}
    for v in variants:
        src = VARIANTS[v][0]
        if src not in bytes_per:
            bytes_per[src] = write_variant(caches / "full", caches / "rs12-draws", caches / src, src, vocab)
    t_caches = time.time() - t0
    print(f"caches ready after {t_caches:.0f} s", flush=True)
    s = StudentBudget().replace(steps=steps, batch_tokens=BATCH_TOKENS).to_json()  # the study's budget
    todo = [{"variant": v, "seed": seed, "cache": str(caches / VARIANTS[v][0]),
             "val_cache": str(caches / "val"),
             "out": str(out / "students" / f"{v}-s{seed}"), "kd": VARIANTS[v][1],
             "alpha": VARIANTS[v][2] or args.alpha, "steps": steps, "student": s,
             "threads": args.threads, "problems": problems, "data_dir": str(assets.test_jsonl.parent),
             "max_new_tokens": 16 if args.quick else args.max_new_tokens}
            for seed in range(seeds) for v in variants]  # seeds outer: every variant at seed 0 first
    runs: dict[str, list[dict[str, Any]]] = {}
    meta = {"quick": args.quick, "steps": steps, "seeds": seeds, "problems": problems, "vocab_size": vocab,
            "alpha": args.alpha, "student": s, "jobs": jobs, "threads": args.threads,
            "machine": host, "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t0)),
            "load_average_start": load_start, "caches_wall_s": t_caches}
    result: dict[str, Any] = {}
    t1 = time.time()
    last_plot = [0.0]

    def done(r: dict[str, Any]) -> None:
        nonlocal result
        runs.setdefault(r["variant"], []).append(r)
        n_done = sum(len(x) for x in runs.values())
        el = time.time() - t1
        eta = el / n_done * (len(todo) - n_done)
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"[{n_done}/{len(todo)}] {r['variant']:18s} seed {r['seed']}: val CE {r['val_ce']:.4f}  "
              f"val KL {r['val_kl']:.4f}  accuracy {acc}  ({r['wall_s']:.0f} s; elapsed "
              f"{time.time() - t0:.0f} s, ETA {eta:.0f} s)", flush=True)
        picture = n_done == len(todo) or time.time() - last_plot[0] >= PLOT_EVERY_S
        result = write_results(out, meta, runs, bytes_per, t0, picture=picture)
        if picture:
            last_plot[0] = time.time()

    if jobs <= 1:
        for j in todo:
            done(student_job(j))
    else:
        from concurrent.futures import as_completed

        from pipeline.demo.stages import job_pool  # a new process per run, as in the demo

        print(f"training {len(todo)} students, {jobs} at a time (one process each, {args.threads} torch "
              f"thread(s))", flush=True)
        with job_pool(jobs) as pool:
            for f in as_completed([pool.submit(student_job, j) for j in todo]):
                done(f.result())
    lock.release()
    return result


def write_results(out: Path, meta: dict[str, Any], runs: dict[str, list[dict[str, Any]]],
                  bytes_per: dict[str, Any], t0: float, picture: bool = True) -> dict[str, Any]:
    """study.json, study.md and (``picture``) study.png from the runs so far, each replaced atomically."""
    table = []
    for v in VARIANTS:
        if v not in runs:
            continue
        rs = sorted(runs[v], key=lambda r: r["seed"])
        man = bytes_per[VARIANTS[v][0]]
        row = {"variant": v, "cache": VARIANTS[v][0], "kd": VARIANTS[v][1],
               "alpha": VARIANTS[v][2] or meta["alpha"],
               "bytes_per_supervised_token": man["stats"]["bytes_per_supervised_token"],
               "mean_kept_ids": (man["stats"].get("fidelity") or {}).get("mean_kept_ids"), "seeds": len(rs)}
        for key in ("val_ce", "val_kl", "val_top1", "accuracy"):
            row[key], row[key + "_std"] = summarise([r.get(key) for r in rs])
        table.append(row)
    result = {"benchmark": "study_cache_size", **meta, "wall_s": time.time() - t0,
              "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
              "load_average_end": os.getloadavg(), "table": table,
              "runs": {v: sorted(rs, key=lambda r: r["seed"]) for v, rs in runs.items()}}
    atomic_write_bytes(out / "study.json", (json.dumps(result, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out / "study.md", markdown(table, runs).encode())
    if picture:
        tmp = out / ".study.tmp.png"
        plot(table, tmp)
        os.replace(tmp, out / "study.png")
    return result


def paired(runs: dict[str, list[dict[str, Any]]], v: str, ref: str, key: str) -> tuple[float, float, int]:
    """Mean and standard deviation over seeds of (``v`` - ``ref``) at the same seed (same initialisation
    and data order: only the targets differ), and the number of seeds both have."""
    base = {r["seed"]: r[key] for r in runs.get(ref, [])}
    ds = [r[key] - base[r["seed"]] for r in runs.get(v, []) if r["seed"] in base]
    if not ds:
        return float("nan"), float("nan"), 0
    return statistics.fmean(ds), statistics.stdev(ds) if len(ds) > 1 else 0.0, len(ds)


def markdown(table: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]] | None = None) -> str:
    """The table (mean ± standard deviation over seeds), then each variant against the exact top-64 cache:
    the difference of the means against the larger of the two seed spreads, and the paired (same-seed)
    difference as mean ± standard deviation."""
    lines = ["| variant | kd | bytes / supervised token | seeds | val CE | val KL | val top-1 agreement | "
             "exact-answer accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        size = "0 (labels only)" if r["alpha"] == 1.0 else f"{r['bytes_per_supervised_token']:.1f}"
        lines.append(f"| {r['variant']} | {r['kd'] if r['alpha'] != 1.0 else 'CE only'} | {size} | "
                     f"{r['seeds']} | {r['val_ce']:.4f} ± {r['val_ce_std']:.4f} | "
                     f"{r['val_kl']:.4f} ± {r['val_kl_std']:.4f} | "
                     f"{100 * r['val_top1']:.1f} ± {100 * r['val_top1_std']:.1f}% | "
                     f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}% |")
    ref = next((r for r in table if r["variant"] == "tail-k64"), None)
    if ref is not None:
        lines += ["", "Against `tail-k64` (exact top-64 cache): the difference of the means, in brackets the "
                  "larger of the two seed standard deviations (a difference inside it is within the seed "
                  "spread); then the paired difference (same seed, so the same initialisation and data "
                  "order) as mean ± standard deviation over seeds:", "",
                  "| variant | val CE | val KL | exact answers (points) | paired val CE | paired val KL | "
                  "paired exact answers (points) |", "|---|---|---|---|---|---|---|"]
        for r in table:
            if r is ref:
                continue
            cells = []
            for key, scale in (("val_ce", 1), ("val_kl", 1), ("accuracy", 100)):
                d = (r[key] - ref[key]) * scale
                spread = max(r[key + "_std"], ref[key + "_std"]) * scale
                mark = "" if abs(d) <= spread else " (outside)"
                cells.append(f"{d:+.4f} [{spread:.4f}]{mark}" if scale == 1
                             else f"{d:+.1f} [{spread:.1f}]{mark}")
            for key, scale in (("val_ce", 1), ("val_kl", 1), ("accuracy", 100)):
                m, sd, n = paired(runs or {}, r["variant"], "tail-k64", key)
                cells.append("-" if n == 0 else f"{m * scale:+.4f} ± {sd * scale:.4f}" if scale == 1
                             else f"{m * scale:+.1f} ± {sd * scale:.1f}")
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def family(variant: str) -> tuple[str, str, str]:
    """(legend label, colour, marker) of a variant's kind of cache."""
    if variant == "full":
        return "full distribution (exact)", "black", "*"
    if variant.startswith("tail-") and variant.endswith("-compact"):
        return "top-k + tail, compact", "tab:orange", "s"
    if variant.startswith("tail-"):
        return "top-k + tail, exact", "tab:blue", "o"
    if variant.startswith("renorm"):
        return "top-k renormalised, exact", "tab:purple", "^"
    if variant.startswith("rs"):
        return "Random Sampling, compact", "tab:green", "D"
    return "adaptive top-p preset, compact", "tab:red", "P"


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, key, label, scale in zip(axes, ("val_ce", "val_kl", "accuracy"),
                                     ("validation CE (nats / supervised token)",
                                      "validation KL(teacher || student) at T = 1 (nats)",
                                      "exact-answer accuracy (%)"), (1, 1, 100)):
        seen = set()
        for r in table:
            if r["alpha"] == 1.0:  # CE only reads no teacher column: a reference band, not a cache size
                m, sd = r[key] * scale, r[key + "_std"] * scale
                ax.axhspan(m - sd, m + sd, color="grey", alpha=0.15)
                ax.axhline(m, color="grey", linestyle="--", linewidth=1, label="CE only (labels, mean ± std)")
                continue
            name, colour, marker = family(r["variant"])
            ax.errorbar(r["bytes_per_supervised_token"], r[key] * scale, yerr=r[key + "_std"] * scale,
                        fmt=marker, color=colour, capsize=3, markersize=7,
                        label=None if name in seen else name)
            seen.add(name)
            ax.annotate(r["variant"], (r["bytes_per_supervised_token"], r[key] * scale), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("train-cache bytes per supervised token (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Student quality against cache size on the demo assets (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
