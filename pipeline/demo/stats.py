"""The demo's statistics: pure functions of the runs' numbers (no file, no model).

Per method, the mean and spread over student seeds; paired differences (method a minus method b on the same
seed); the share of the CE-only-to-teacher gap KD closes; the step at which KD reaches CE-only's final
validation CE; a paired bootstrap over held-out problems; and the verdicts the report states.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

METHODS = ("kd", "ce")
WRITTEN = "kdw"  # KD on the teacher-written solutions plus the reference answers
# The report's row for the teacher's writing when it runs beside the students (``train_students``)
WRITER_JOB = "teacher writes, then scores (cache-written)"
BOOTSTRAP = 2000
# The per-run metrics the report summarises (mean and spread over seeds, paired KD - CE differences).
RUN_METRICS = ("strict_acc", "flexible_acc", "val_ce", "val_kl", "val_top1_agree")


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals, "n": len(vals)}


def kd_reaches_step(metrics: list[dict[str, Any]], target: float) -> int | None:
    """The first evaluation step at which a KD run's validation CE (its ``metrics.jsonl`` rows) is at or
    below ``target``."""
    for r in metrics:
        if r.get("event") == "eval" and r.get("val_ce") is not None and r["val_ce"] <= target:
            return int(r["step"])
    return None


def curve_points(run: dict[str, Any], metrics: list[dict[str, Any]],
                 final_records: list[dict[str, Any]] | None, n_curve: int) -> dict[str, list]:
    """Validation CE and exact-answer accuracy (first ``n_curve`` test problems) against steps for one run,
    from its ``metrics.jsonl`` rows; the final point of the accuracy curve is read from the final
    evaluation's records (None: not evaluated)."""
    rows = [r for r in metrics if r.get("event") == "eval"]
    ce = [(int(r["step"]), float(r["val_ce"])) for r in rows if r.get("val_ce") is not None]
    acc = [(r["step"], r["strict_correct"] / r["n"]) for r in run["curve_exact"] if r["n"]]
    if final_records is not None and n_curve:
        rec = final_records[:n_curve]
        acc.append((int(run["final"]["step"]), sum(r["strict_correct"] for r in rec) / len(rec)))
    return {"val_ce": ce, "strict_acc": acc}


def build_summary(teacher: dict[str, Any], runs: dict[str, dict[str, Any]],
                  seeds: list[int]) -> dict[str, Any]:
    """Per-method mean/spread, paired KD - CE differences, gap closed, KD-reaches-CE step, verdict."""
    methods = [m for m in (*METHODS, WRITTEN) if all(run_name(m, sd) in runs for sd in seeds)]
    per = {m: {k: spread([runs[run_name(m, s)][k] for s in seeds]) for k in RUN_METRICS
               if all(runs[run_name(m, s)][k] is not None for s in seeds)} for m in methods}

    def paired_diff(a: str, b: str) -> dict[str, Any]:
        """Per metric, the spread of method a's value minus method b's on the same seed."""
        return {k: spread([runs[run_name(a, s)][k] - runs[run_name(b, s)][k] for s in seeds])
                for k in RUN_METRICS if k in per[a] and k in per[b]}

    paired = paired_diff("kd", "ce")
    gap = [(runs[run_name("ce", s)]["val_ce"] - runs[run_name("kd", s)]["val_ce"])
           / (runs[run_name("ce", s)]["val_ce"] - teacher["val_ce"]) for s in seeds]
    reach = {s: runs[run_name("kd", s)]["kd_reaches_ce_final_step"] for s in seeds}
    verdict: dict[str, Any] = {}
    if "strict_acc" in paired:
        kd, ce = per["kd"]["strict_acc"], per["ce"]["strict_acc"]
        margin = max(kd["std"], ce["std"])
        verdict["exact_answer"] = {"kd_minus_ce": kd["mean"] - ce["mean"], "seed_spread": margin,
                                   "pass": kd["mean"] - ce["mean"] > margin}
    for k in ("val_ce", "val_kl"):
        verdict[k] = {"kd_minus_ce": paired[k]["mean"], "kd_better_every_seed": paired[k]["max"] < 0,
                      "pass": per["kd"][k]["mean"] < per["ce"][k]["mean"]}
    verdict["pass"] = all(v["pass"] for v in verdict.values())
    out = {"methods": per, "paired_kd_minus_ce": paired, "gap_closed": spread(gap),
           "kd_reaches_ce_final_val_ce_step": reach, "verdict": verdict}
    if WRITTEN in per:
        out["paired_written"] = {other: paired_diff(WRITTEN, other) for other in METHODS}
    return out


def paired_bootstrap(a: list[list[bool]], b: list[list[bool]], n: int, *, draws: int = BOOTSTRAP,
                     seed: int = 0) -> dict[str, float]:
    """Mean over seeds of accuracy(a) - accuracy(b) on the first ``n`` problems, with a 95% interval from a
    paired bootstrap over problems: the same resampled problems for every seed and both methods, so the
    interval covers the problem sample (seeds are summarised separately by their spread). ``a[s][i]``: seed
    s answered problem i correctly."""
    x = np.asarray([row[:n] for row in a], dtype=np.float64).mean(0)  # (n,) mean over seeds
    y = np.asarray([row[:n] for row in b], dtype=np.float64).mean(0)
    d = x - y
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    boot = d[idx].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"n": n, "diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def written_verdict(summary: dict[str, Any], correct: dict[str, list[bool]], seeds: list[int],
                    checkpoints: list[int]) -> dict[str, Any]:
    """KD on teacher-written data against KD on references and against CE only: the paired mean difference
    of exact answers, the seed spread, and a paired bootstrap interval over problems at every number of
    held-out problems in ``checkpoints``. The goal: at least 10 points and more than three seed spreads
    over KD on references, more over CE only, with the interval above 0 at every number."""
    per = summary["methods"]
    out: dict[str, Any] = {}
    for other, goal in (("kd", 0.10), ("ce", None)):
        if "strict_acc" not in per.get(WRITTEN, {}) or "strict_acc" not in per.get(other, {}):
            continue
        a, b = per[WRITTEN]["strict_acc"], per[other]["strict_acc"]
        diff = a["mean"] - b["mean"]
        spread_ = max(a["std"], b["std"])
        at = [paired_bootstrap([correct[run_name(WRITTEN, s)] for s in seeds],
                               [correct[run_name(other, s)] for s in seeds], n, seed=n) for n in checkpoints]
        v = {"diff": diff, "seed_spread": spread_, "by_problems": at, "interval_above_zero_everywhere":
             all(x["lo"] > 0 for x in at)}
        if goal is not None:
            v["goal"] = goal
            v["pass"] = diff >= goal and diff > 3 * spread_ and v["interval_above_zero_everywhere"]
        out[other] = v
    if "kd" in out and "ce" in out:
        ce = out["ce"]
        ce["pass"] = ce["diff"] > out["kd"]["diff"] and ce["interval_above_zero_everywhere"]
        out["pass"] = out["kd"]["pass"] and out["ce"]["pass"]
    return out


def problem_checkpoints(n: int) -> list[int]:
    """The numbers of held-out problems the report checks the verdict at: every 100 (fewer for small
    runs) up to ``n``."""
    step = 100 if n >= 300 else max(1, n // 3)
    return sorted({*range(step, n + 1, step), n})
