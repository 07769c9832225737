"""``fnet-distill demo``: the whole pipeline end to end, then a KD-vs-CE report over several student seeds.

Stages, each with its own folder under ``out``:

1. ``assets/``: data, tokenizer and teacher. The embedded default (``pipeline.demo.build_demo_assets``: the
   shipped teacher when its fingerprint matches, else trained), or with ``gsm8k=True`` a GSM8K slice + the
   real Qwen2 tokenizer from ``shared`` + a small random-init Qwen2 teacher (a smoke test of the real path).
   Reused while their settings are unchanged.
2. ``cache-train/``, ``cache-test/``: ``run_teacher_cache`` on both splits (fingerprinted; a finished cache of
   the same fingerprint is reused, one of another fingerprint is rebuilt). ``cache-written/``: the teacher
   writes solutions to new questions and scores the kept ones; with two or more student processes it does
   so in one of them, first, while the runs on reference answers train in the others (one thread: the same
   bytes as on more).
3. ``student-kd-s<seed>/``, ``student-ce-s<seed>/`` for each student seed: ``train_student`` with the same
   student, steps, data order, initialisation (the seed) and learning rate; only ``alpha`` differs (CE-only is
   ``alpha = 1``). At every evaluation point the checkpoint also answers the first ``curve_problems`` test
   problems (``exact.jsonl``), so accuracy has a curve. Always retrained.
4. ``eval-teacher.jsonl``, ``eval-{kd,ce}-s<seed>.jsonl``: greedy exact-answer accuracy on the test split
   (``evaluate_model``).
5. ``report.md``, ``report.json``, ``curves.png``: per-seed rows, mean and spread per method, paired KD - CE
   differences, the share of the CE-only-to-teacher gap KD closes, the step at which KD reaches CE-only's
   final validation CE, and the acceptance verdict.

The modules: ``config`` (``DemoConfig`` and the sizes it resolves to), ``budget`` (the student, as overrides
of ``TrainConfig``), ``stages`` (stages 1-4 and the students' process pool), ``stats`` (the summary's numbers,
pure functions) and ``report`` (``report.md`` and ``curves.png`` from ``report.json``'s data alone); this
module runs them in turn.

Validation metrics are the training loop's evaluations on ``cache-test`` (label CE, KL(teacher || student)
at T = 1 over top-k + tail, top-1 agreement with the teacher). The teacher's row is its own label CE on the
same supervised tokens (KL 0 and agreement 1 by definition).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cache.device import machine_info
from cache.util import atomic_write_bytes, atomic_write_json, lock_run_folder
from pipeline.demo.config import DemoConfig
from pipeline.demo.report import plot_report, render_report
from pipeline.demo.stages import (
    WRITER,
    Log,
    embedded_assets,
    eval_stage,
    gsm8k_assets,
    teacher_cache_stage,
    teacher_label_ce,
    train_students,
    written_stage,
)
from pipeline.demo.stats import (
    WRITER_JOB,
    WRITTEN,
    build_summary,
    curve_points,
    kd_reaches_step,
    problem_checkpoints,
    run_name,
    written_verdict,
)
from student.modeling import CausalFNetForCausalLM, count_parameters

# What report.json keeps of each cache's summary.
CACHE_FIELDS = ("sequences", "tokens", "supervised_tokens", "bytes", "bytes_per_token",
                "bytes_per_supervised_token", "units_skipped", "units_total", "written", "kept_correct",
                "wall_seconds")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def teacher_row(cfg: DemoConfig, val: dict[str, Any], exact: dict[str, Any] | None) -> dict[str, Any]:
    """The teacher's numbers: label CE on the validation split, exact answers, and (for the curves) its
    accuracy on the first ``curve_problems`` test problems."""
    row = {"val_ce": val["ce"], "val_label_acc": val["top1"], "val_tokens": val["tokens"],
           "val_ppl": val["ppl"], "exact": exact,
           "strict_acc": None if exact is None else exact["strict_acc"]}
    n_curve = cfg.resolved_curve_problems()
    row["curve_strict_acc"] = row["strict_acc"]
    if exact is not None and n_curve:
        rec = read_jsonl(cfg.out / "eval-teacher.jsonl")[:n_curve]
        row["curve_strict_acc"] = sum(r["strict_correct"] for r in rec) / len(rec)
    return row


def run_row(trained: dict[str, dict[str, Any]], method: str, seed: int) -> dict[str, Any]:
    """One student run's numbers: its final validation metrics, exact answers, and (KD) the step at which
    it reached the CE-only run's final validation CE."""
    name = run_name(method, seed)
    t = trained[name]
    f, e = t["final"], t["exact"]
    ce_final = trained[run_name("ce", seed)]["final"].get("val_ce")
    reach = (kd_reaches_step(read_jsonl(Path(t["out"]) / "metrics.jsonl"), ce_final)
             if method == "kd" and ce_final is not None else None)
    return {"method": method, "seed": seed, "out": t["out"], "alpha": t["alpha"],
            "val_ce": f.get("val_ce"), "val_kl": f.get("val_kl"), "val_top1_agree": f.get("val_top1_agree"),
            "val_label_acc": f.get("val_label_acc"), "val_tokens": f.get("val_tokens"),
            "train_wall_s": f.get("wall_s"), "exact": e,
            "strict_acc": None if e is None else e["strict_acc"],
            "flexible_acc": None if e is None else e["flexible_acc"],
            "kd_reaches_ce_final_step": reach,
            "curve_exact": t["curve_exact"], "final": f}


def run_curves(cfg: DemoConfig, run: dict[str, Any]) -> dict[str, list]:
    """A run's validation CE and exact-answer accuracy against steps (``curve_points``)."""
    name = run_name(run["method"], run["seed"])
    final = None if run["exact"] is None else read_jsonl(cfg.out / f"eval-{name}.jsonl")
    return curve_points(run, read_jsonl(Path(run["out"]) / "metrics.jsonl"), final,
                        cfg.resolved_curve_problems())


def run_demo(cfg: DemoConfig, log: Log | None = None) -> dict[str, Any]:
    """Run every stage into ``cfg.out`` and write ``report.md``, ``report.json`` and ``curves.png``. One demo
    at a time per folder: a second is refused in one line naming the first (the lock dies with it)."""
    run_lock = lock_run_folder(cfg.out, "demo")
    try:
        return _run_demo(cfg, log or (lambda msg: print(msg, file=sys.stderr, flush=True)))
    finally:
        run_lock.release()


def _run_demo(cfg: DemoConfig, log: Log) -> dict[str, Any]:
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    wall: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        log(f"== {stage}")
        t0 = time.perf_counter()
        result = fn()
        wall[stage] = time.perf_counter() - t0
        return result

    assets = timed("assets", lambda: (gsm8k_assets if cfg.gsm8k else embedded_assets)(cfg, log))
    s = cfg.resolved_student()
    seeds = cfg.student_seeds()
    temps = tuple(sorted({1.0, float(s.temperature)}))
    caches = {split: timed(f"teacher-cache {split}",
                           lambda sp=split: teacher_cache_stage(cfg, assets, sp, temps, log))
              for split in ("train", "test")}
    methods = cfg.methods()
    jobs = [(m, sd) for sd in seeds for m in methods]
    n_jobs = min(cfg.resolved_jobs(), len(jobs))
    # With one job at a time the teacher writes alone first, on every usable core; with more, it writes in
    # one of the student processes (one thread, the same bytes) while the runs on reference answers train.
    beside = WRITTEN in methods and n_jobs > 1
    if WRITTEN in methods and not beside:
        if cfg.num_threads is not None:  # nothing else runs now: the writer may use every usable core
            torch.set_num_threads(max(cfg.num_threads, cfg.resolved_jobs()))
        caches["written"] = timed("teacher-cache written (the teacher writes, then scores)",
                                  lambda: written_stage(cfg, assets, temps, log))
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
    for old in [*cfg.out.glob("student-*"), *cfg.out.glob("eval-*.jsonl")]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()     # runs of an earlier, other seed set
    jobs_wall: dict[str, float] = {}

    def teacher_measurements() -> tuple[dict[str, Any], dict[str, Any] | None]:
        t0 = time.perf_counter()
        val = teacher_label_ce(assets, "test", cfg.max_length(), cfg.resolved_val_problems())
        t1 = time.perf_counter()
        quiet = replace(cfg, progress=False) if n_jobs > 1 else cfg
        ex = eval_stage(quiet, assets, "teacher", assets.teacher_dir)
        jobs_wall.update({"teacher val CE": t1 - t0, "eval teacher": time.perf_counter() - t1})
        log(f"teacher: val CE {val['ce']:.4f}" + ("" if ex is None else
                                                   f", exact answer {ex['strict_correct']}/{ex['n']}"))
        return val, ex

    stage = (f"students: train + eval ({len(jobs)} runs, {n_jobs} at a time"
             + ("; the teacher writes first, in one of them" if beside else "")
             + "; teacher val CE and eval alongside)")
    trained, (teacher_val, teacher_exact), wrote, timeline = timed(
        stage, lambda: train_students(cfg, assets, jobs, log, alongside=teacher_measurements,
                                      temperatures=temps if beside else None))
    jobs_pid = {name: r["pid"] for name, r in trained.items() if "pid" in r}  # empty with one process
    if wrote is not None:
        caches["written"] = wrote["summary"]
        jobs_wall[WRITER_JOB] = wrote["wall_s"]
        jobs_pid[WRITER] = wrote["pid"]
    for name, r in trained.items():
        jobs_wall[f"train {name}"] = r["final"].get("wall_s", float("nan"))
        jobs_wall[f"eval {name}"] = r["eval_wall_s"]

    teacher = teacher_row(cfg, teacher_val, teacher_exact)
    runs = {run_name(m, sd): run_row(trained, m, sd) for sd in seeds for m in methods}
    curves = {m: [run_curves(cfg, runs[run_name(m, sd)]) for sd in seeds] for m in methods}
    summary = build_summary(teacher, runs, seeds)
    n_eval = cfg.resolved_eval_limit()
    if WRITTEN in methods and n_eval:
        correct = {name: [bool(r["strict_correct"]) for r in read_jsonl(cfg.out / f"eval-{name}.jsonl")]
                   for name in runs}
        summary["written_verdict"] = written_verdict(summary, correct, seeds, problem_checkpoints(n_eval))
    student = CausalFNetForCausalLM.from_pretrained(Path(runs[run_name("kd", seeds[0])]["out"]) / "final")
    report = {
        "variant": "gsm8k smoke test" if cfg.gsm8k else ("tiny" if cfg.tiny else "embedded default"),
        "config": cfg.to_json(), "assets": assets.info, "machine": machine_info(),
        "student_parameters": count_parameters(student),
        "data": {"train": caches["train"]["sequences"], "test": caches["test"]["sequences"],
                 "epochs": (s.steps * s.batch_tokens) / max(1, caches["train"]["tokens"])},
        "teacher": teacher, "runs": runs, "summary": summary, "curves": curves,
        "caches": {split: {k: c[k] for k in CACHE_FIELDS if k in c} for split, c in caches.items()},
        "methods": list(methods),
        "train": {name: {k: v for k, v in r.items() if k not in ("exact", "pid")}
                  for name, r in trained.items()},
        "wall_s": wall, "jobs_wall_s": jobs_wall, "jobs_timeline_s": timeline,
        "jobs_pid": jobs_pid,
        "files": {"report_md": "report.md", "report_json": "report.json", "curves": "curves.png",
                  "assets": "assets", "caches": [f"cache-{c}" for c in caches],
                  "students": [f"student-{n}" for n in runs],
                  "eval": [f"eval-{n}.jsonl" for n, e in [("teacher", teacher_exact),
                                                          *((n, r["exact"]) for n, r in runs.items())]
                           if e is not None]},
    }
    plot_report(report, cfg.out / "curves.png")
    wall["total"] = time.perf_counter() - t_start
    # rendered from the report as report.json holds it (keys sorted, seeds as strings): report.md is a
    # function of report.json alone
    report["markdown"] = render_report(json.loads(json.dumps(report, sort_keys=True)))
    atomic_write_json(cfg.out / "report.json", report)
    atomic_write_bytes(cfg.out / "report.md", report["markdown"].encode())
    return report
