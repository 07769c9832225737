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
    top-p0.9           topk_tail on the compact adaptive-k cache (p = 0.9, k <= 64)

Each variant trains ``--seeds`` students with the same steps, token budget, learning rate and alpha; the
table gives bytes per supervised token of its train cache against validation CE and KL (the trainer's own
evaluation on the full-distribution test cache) and exact-answer accuracy (greedy, strict) on the first
``--problems`` test problems, as mean and standard deviation over seeds; the picture plots the same.

    nice -n 5 python bench/study_cache_size.py --out runs/study         # make study (~30 min, 2 cores)
    python bench/study_cache_size.py --out /tmp/study --quick           # a smoke run in about a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache.format import (  # noqa: E402
    CacheRecord,
    CacheSettings,
    CacheWriter,
    FingerprintMismatch,
    open_cache,
)
from cache.util import UserError  # noqa: E402

TEMPS = (1.0, 2.0)
# name -> (train cache, kd kind, alpha); alpha 1.0 is CE only
VARIANTS: dict[str, tuple[str, str, float]] = {
    "ce": ("full", "topk_tail", 1.0),
    "full": ("full", "topk_tail", 0.5),
    "tail-k64": ("k64", "topk_tail", 0.5),
    "tail-k64-compact": ("k64-compact", "topk_tail", 0.5),
    "tail-k16": ("k16", "topk_tail", 0.5),
    "tail-k16-compact": ("k16-compact", "topk_tail", 0.5),
    "tail-k4": ("k4", "topk_tail", 0.5),
    "tail-k4-compact": ("k4-compact", "topk_tail", 0.5),
    "tail-k1": ("k1", "topk_tail", 0.5),
    "tail-k1-compact": ("k1-compact", "topk_tail", 0.5),
    "renorm-k16": ("k16", "topk_renorm", 0.5),
    "rs12": ("rs12", "sampled", 0.5),
    "rs50": ("rs50", "sampled", 0.5),
    "top-p0.9": ("top-p0.9", "topk_tail", 0.5),
}
QUICK_VARIANTS = ("ce", "tail-k4-compact", "rs12")


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
    k = {"rs12": 1, "rs50": 1, "top-p0.9": 64}.get(name) or int(name.split("-")[0].removeprefix("k"))
    k = min(k, vocab)
    draws = open_cache(rs12) if name == "rs12" else full
    samples = draws.samples if name in ("rs12", "rs50") else 0
    s = CacheSettings(topk=k, vocab_size=vocab, samples=samples, temperatures=TEMPS, dtype="float32",
                      encoding="compact" if compact else "exact",
                      top_p=0.9 if name == "top-p0.9" else None)
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="Working folder (assets, caches, students, results).")
    ap.add_argument("--assets", type=Path, default=None, help="An existing demo assets folder to use.")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="Optimizer steps per student (equal budget).")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--problems", type=int, default=100, help="Test problems answered per student.")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of the variants.")
    ap.add_argument("--quick", action="store_true", help="Tiny assets, 3 variants, 1 seed, a few steps.")
    args = ap.parse_args(argv)
    from pipeline.demo.assets import build_demo_assets
    from pipeline.evaluate import evaluate_model
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
    from student.train import TrainConfig, train_student

    variants = QUICK_VARIANTS if args.quick else tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = 1 if args.quick else args.seeds
    steps = 4 if args.quick else args.steps
    problems = 4 if args.quick else args.problems
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
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
    print(f"caches ready after {time.time() - t0:.0f} s", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    result: dict[str, Any] = {}
    for seed in range(seeds):  # seeds outer: a run stopped early still has every variant at seed 0
        for v in variants:
            src, kind, alpha = VARIANTS[v]
            sd = out / "students" / f"{v}-s{seed}"
            shutil.rmtree(sd, ignore_errors=True)
            cfg = TrainConfig(cache=caches / src, val_cache=caches / "val", out=sd, hidden_size=64, layers=2,
                              ffn=256, window=16, max_positions=512, dropout=0.0, steps=steps,
                              batch_tokens=args.batch_tokens, lr=3e-3, min_lr=3e-4,
                              warmup=max(1, steps // 10),
                              alpha=alpha, temperature=1.0, kd=kind, eval_every=0, save_every=0,
                              log_every=max(1, steps // 5), seed=seed, device="cpu", num_workers=0,
                              progress=False)
            res = train_student(cfg)
            acc = evaluate_model(res.out_dir / "final", str(assets.test_jsonl.parent), "test", problems,
                                 max_new_tokens=16 if args.quick else 160, batch_size=50, device="cpu",
                                 dtype="float32", progress=False)
            m = res.final_metrics
            runs.setdefault(v, []).append({"seed": seed, "val_ce": m.get("val_ce"), "val_kl": m.get("val_kl"),
                                           "accuracy": acc.strict_correct / max(acc.n, 1), "n": acc.n,
                                           "wall_s": res.wall_s})
            print(f"{v:18s} seed {seed}: val CE {m.get('val_ce', float('nan')):.4f}  accuracy "
                  f"{runs[v][-1]['accuracy']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
            result = write_results(out, args, runs, bytes_per, steps, seeds, problems, vocab, t0)
    return result


def write_results(out: Path, args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
                  bytes_per: dict[str, Any], steps: int, seeds: int, problems: int, vocab: int,
                  t0: float) -> dict[str, Any]:
    """study.json, study.md and study.png from the runs so far (rewritten after every student)."""
    table = []
    for v, rs in runs.items():
        man = bytes_per[VARIANTS[v][0]]
        row = {"variant": v, "cache": VARIANTS[v][0], "kd": VARIANTS[v][1], "alpha": VARIANTS[v][2],
               "bytes_per_supervised_token": man["stats"]["bytes_per_supervised_token"], "seeds": len(rs)}
        for key in ("val_ce", "val_kl", "accuracy"):
            row[key], row[key + "_std"] = summarise([r[key] for r in rs])
        table.append(row)
    result = {"benchmark": "study_cache_size", "quick": args.quick, "steps": steps, "seeds": seeds,
              "problems": problems, "vocab_size": vocab, "wall_s": time.time() - t0, "table": table,
              "runs": runs}
    (out / "study.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    lines = ["| variant | bytes/sup. token | seeds | val CE | val KL | exact-answer accuracy |",
             "|---|---|---|---|---|---|"]
    for r in table:
        size = "— (labels only)" if r["alpha"] == 1.0 else f"{r['bytes_per_supervised_token']:.1f}"
        lines.append(f"| {r['variant']} | {size} | {r['seeds']} | "
                     f"{r['val_ce']:.4f} ± {r['val_ce_std']:.4f} | "
                     f"{r['val_kl']:.4f} ± {r['val_kl_std']:.4f} | "
                     f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f} |")
    (out / "study.md").write_text("\n".join(lines) + "\n")
    plot(table, out / "study.png")
    return result


def plot(table: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, label in zip(axes, ("val_ce", "val_kl", "accuracy"),
                              ("validation CE (nats)", "validation KL to the teacher (nats)",
                               "exact-answer accuracy")):
        for r in table:
            if r["alpha"] == 1.0:  # CE only reads no teacher column: a reference line, not a cache size
                ax.axhline(r[key], color="grey", linestyle="--", linewidth=1)
                ax.annotate("CE only", (0.01, r[key]), xycoords=("axes fraction", "data"), fontsize=7)
                continue
            ax.errorbar(r["bytes_per_supervised_token"], r[key], yerr=r[key + "_std"], fmt="o", capsize=3)
            ax.annotate(r["variant"], (r["bytes_per_supervised_token"], r[key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("cache bytes per supervised token (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Student quality vs cache size (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
