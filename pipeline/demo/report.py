"""The demo's report: ``report.md`` (``render_report``) and ``curves.png`` (``plot_report``) drawn from
``report.json``'s data alone (no training, no other file), so a stored ``report.json`` renders to the same
report again."""

from __future__ import annotations

import io
import math
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cache.progress import format_duration
from cache.util import atomic_write_bytes
from pipeline.demo.stats import BOOTSTRAP, METHODS, WRITER_JOB, WRITTEN, run_name

METHOD_NAMES = {"teacher": "teacher", "kd": "KD", "ce": "CE only", WRITTEN: "KD + teacher-written"}
# report.json stores its keys sorted; the rows keep the order the run wrote them in: stages as they ran (a
# stage's name starts with one of these), caches by split.
STAGE_ORDER = ("assets", "teacher-cache train", "teacher-cache test", "teacher-cache written", "students",
               "total")
CACHE_ORDER = ("train", "test", "written")


def _ordered(names: Any, order: list[str] | tuple[str, ...], *, prefix: bool = False) -> list[str]:
    """``names`` in the order of ``order`` (the entry each equals, or with ``prefix`` starts with); names
    matching none last."""
    def rank(name: str) -> int:
        return next((i for i, o in enumerate(order) if (name.startswith(o) if prefix else name == o)),
                    len(order))

    return sorted(names, key=rank)


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pm(d: dict[str, Any] | None, spec: str, scale: float = 1.0) -> str:
    if d is None:
        return "n/a"
    return f"{format(d['mean'] * scale, spec)} ± {format(d['std'] * scale, spec.lstrip('+'))}"


def _acc(e: dict[str, Any] | None, key: str) -> str:
    if e is None:
        return "not run"
    return f"{e[key]:.1%} ({e[key.replace('_acc', '_correct')]}/{e['n']})"


def _size_ratio(teacher: int, student: int) -> str:
    """``5.8x fewer`` than the teacher, or ``1.1x more`` when the student is the larger one (--tiny)."""
    return f"{teacher / student:.1f}x fewer" if teacher >= student else f"{student / teacher:.1f}x more"


def written_section(report: dict[str, Any]) -> list[str]:
    """What the teacher wrote and kept, and the verdict of KD on it against KD on references and CE only,
    with paired bootstrap intervals at every number of held-out problems."""
    c = report["caches"].get("written")
    wv = report["summary"].get("written_verdict")
    if c is None:
        return []
    w = c["written"]
    n_kept = c["sequences"]
    lines = ["", f"**Teacher-written data.** The teacher wrote {w['samples']:,} solutions "
             f"({w['new_tokens']:,} tokens) to {w['questions']:,} new questions "
             f"({report['config']['write_samples']} each, T {report['config']['write_temperature']:g}, "
             f"top-p 0.95) and {n_kept:,} were kept "
             + ("by self-consistency alone: the final answer agrees with the unique majority of the "
                f"question's samples, with at least {report['config']['write_min_vote']:.0%} of the votes, "
                f"exact duplicates dropped ({w['questions_kept']:,} questions kept, {w['ties']:,} tied)"
                if report["config"]["resolved"].get("write_keep") == "majority" else
                "(every solution that ended, exact duplicates dropped: --tiny's teacher is barely trained)")
             + ". The generator knows the answers (never used to keep): the teacher's samples are "
             f"{w['teacher_accuracy']:.1%} correct, the kept ones {c['kept_correct'] / max(1, n_kept):.1%}. "
             f"The {METHOD_NAMES[WRITTEN]} students train on these {n_kept:,} solutions plus the "
             f"{report['data']['train']:,} reference answers, with the same steps and seeds."]
    if wv:
        def row(other: str) -> str:
            v = wv[other]
            cells = [f"{x['diff'] * 100:+.1f} [{x['lo'] * 100:+.1f}, {x['hi'] * 100:+.1f}]"
                     for x in v["by_problems"]]
            return f"| {METHOD_NAMES[WRITTEN]} - {METHOD_NAMES[other]} | " + " | ".join(cells) + " |"

        ns = [x["n"] for x in wv["kd"]["by_problems"]]
        k, ce = wv["kd"], wv["ce"]
        lines += ["", f"**Verdict (teacher-written).** {METHOD_NAMES[WRITTEN]} beats KD on references by "
                  f"{k['diff'] * 100:+.1f} points against a seed spread of {k['seed_spread'] * 100:.1f} "
                  f"(goal: >= {k['goal'] * 100:.0f} points and > 3 spreads, the interval above 0 at every "
                  f"number of problems): **{'yes' if k['pass'] else 'no'}**; it beats CE only by "
                  f"{ce['diff'] * 100:+.1f} points (goal: by more than it beats KD on references, the "
                  f"interval above 0 at every number): **{'yes' if ce['pass'] else 'no'}**.", "",
                  "Paired difference of exact answers (points, mean over seeds) on the first N held-out "
                  f"problems, with a 95% paired bootstrap interval over problems ({BOOTSTRAP} draws):", "",
                  "| N | " + " | ".join(map(str, ns)) + " |", "|---|" + "---|" * len(ns),
                  row("kd"), row("ce")]
    return lines


def render_report(report: dict[str, Any]) -> str:
    """The markdown report: teacher, per-method mean ± spread, per-seed rows, paired differences, verdict,
    wall time per stage, cache sizes, machine."""
    t, sm, s = report["teacher"], report["summary"], report["config"]["resolved"]["student"]
    seeds = report["config"]["resolved"]["seeds"]
    a = report["assets"]
    lines = [f"# fnet-distill demo report ({report['variant']})", "",
             f"Teacher: Qwen2 ({a['teacher_parameters']:,} parameters, {a.get('teacher_source', 'built')}); "
             f"student: causal STFT FNet ({report['student_parameters']:,} parameters, "
             f"{_size_ratio(a['teacher_parameters'], report['student_parameters'])}; d={s['hidden_size']}, "
             f"{s['layers']} layer{'s' if s['layers'] != 1 else ''}, FFN {s['ffn']}, W={s['window']}, "
             "receptive field "
             f"{s['layers'] * (s['window'] - 1) + 1} tokens). {report['data']['train']:,} training problems, "
             f"{s['steps']} steps of <= {s['batch_tokens']} tokens ({report['data']['epochs']:.1f} epochs), "
             f"lr {s['lr']:g}; KD = `{s['kd']}` from the cache (top-{report['config']['topk']} + tail), "
             f"alpha {s['alpha']:g}, T {s['temperature']:g}; CE only = alpha 1. Student seeds "
             f"{', '.join(map(str, seeds))}: per seed the KD and CE-only runs share initialisation and data "
             "order.", "",
             f"Exact answer on {t['exact']['n'] if t['exact'] else 0} held-out problems; ± is the standard "
             "deviation over seeds.", "",
             "| model | exact answer (strict `#### N`) | exact answer (last number) | val CE (nats/token) "
             "| KL to teacher (T=1) | top-1 agreement |",
             "|---|---|---|---|---|---|",
             f"| teacher | {_acc(t['exact'], 'strict_acc')} | {_acc(t['exact'], 'flexible_acc')} | "
             f"{_fmt(t['val_ce'], '.4f')} | 0 | 100% |"]
    methods = report.get("methods", list(METHODS))
    for m in ([WRITTEN] if WRITTEN in methods else []) + list(METHODS):
        p = sm["methods"][m]
        lines.append(f"| {METHOD_NAMES[m]} student ({len(seeds)} seeds) | "
                     f"{_pm(p.get('strict_acc'), '.1f', 100)}% "
                     f"| {_pm(p.get('flexible_acc'), '.1f', 100)}% | {_pm(p.get('val_ce'), '.4f')} | "
                     f"{_pm(p.get('val_kl'), '.4f')} | {_pm(p.get('val_top1_agree'), '.1f', 100)}% |")
    pairs = [("KD - CE only", sm["paired_kd_minus_ce"])]
    if "paired_written" in sm:
        pairs = [(f"{METHOD_NAMES[WRITTEN]} - KD", sm["paired_written"]["kd"]),
                 (f"{METHOD_NAMES[WRITTEN]} - CE only", sm["paired_written"]["ce"])] + pairs
    for label, d in pairs:
        lines.append(f"| {label} (paired) | {_pm(d.get('strict_acc'), '+.1f', 100)} pts | "
                     f"{_pm(d.get('flexible_acc'), '+.1f', 100)} pts | {_pm(d.get('val_ce'), '+.4f')} | "
                     f"{_pm(d.get('val_kl'), '+.4f')} | {_pm(d.get('val_top1_agree'), '+.1f', 100)} pts |")
    lines += written_section(report)
    v = sm["verdict"]
    g = sm["gap_closed"]
    reach = sm["kd_reaches_ce_final_val_ce_step"]
    lines += ["", "**Verdict.** " + " ".join(filter(None, [
        (f"KD beats CE only on exact answers by {v['exact_answer']['kd_minus_ce'] * 100:+.1f} points "
         "against a "
         f"seed spread of {v['exact_answer']['seed_spread'] * 100:.1f}: "
         f"**{'yes' if v['exact_answer']['pass'] else 'no'}**.") if "exact_answer" in v else None,
        f"On validation CE ({v['val_ce']['kd_minus_ce']:+.4f}): "
        f"**{'yes' if v['val_ce']['pass'] else 'no'}**; "
        f"on KL to the teacher ({v['val_kl']['kd_minus_ce']:+.4f}): "
        f"**{'yes' if v['val_kl']['pass'] else 'no'}**.",
        f"KD closes {g['mean']:.0%} ± {g['std']:.0%} of the CE-only-to-teacher validation-CE gap.",
        "KD reaches CE only's final validation CE at step " + ", ".join(
            f"{'never' if reach[str(sd)] is None else reach[str(sd)]} (seed {sd})" for sd in seeds)
        + f" of {s['steps']}.",
    ])), "", "Per seed:", "",
        "| run | seed | exact (strict) | exact (last number) | val CE | KL to teacher | top-1 agreement |",
        "|---|---|---|---|---|---|---|"]
    for sd in seeds:
        for m in methods:
            r = report["runs"][run_name(m, sd)]
            lines.append(f"| {METHOD_NAMES[m]} | {sd} | {_acc(r['exact'], 'strict_acc')} | "
                         f"{_acc(r['exact'], 'flexible_acc')} | {_fmt(r['val_ce'], '.4f')} | "
                         f"{_fmt(r['val_kl'], '.4f')} | {_fmt(r['val_top1_agree'], '.2%')} |")
    n_val = report["config"]["resolved"].get("val_problems")
    lines += ["", f"Validation: {report['teacher']['val_tokens']:,} supervised tokens of "
              + ("the test split" if n_val is None else f"the first {n_val:,} test problems") + ". "
              "Curves: `curves.png`.", "",
              "| stage | wall time (s) |", "|---|---|"]
    for stage in _ordered(report["wall_s"], STAGE_ORDER, prefix=True):
        lines.append(f"| {stage} | {report['wall_s'][stage]:.1f} |")
    jobs_wall = report.get("jobs_wall_s", {})
    job_order = [WRITER_JOB, "teacher val CE", "eval teacher", *(f"{what} {run_name(m, sd)}" for sd in seeds
                                                     for m in methods for what in ("train", "eval"))]
    for job in _ordered(jobs_wall, job_order):
        lines.append(f"| &nbsp;&nbsp;{job} | {jobs_wall[job]:.1f} |")
    if report.get("jobs_wall_s"):
        teacher = ("the teacher's writing in one of the student processes, first, beside the runs on "
                   "reference answers; its measurements" if WRITER_JOB in jobs_wall else "the teacher's")
        lines += ["", f"Indented rows ran inside the students stage, in parallel ({teacher} in the main "
                  "process while the students trained), so they add up to more than it."]
    c = report["caches"]
    lines += ["", "| cache | sequences | tokens | bytes | bytes/token | bytes/supervised token |",
              "|---|---|---|---|---|---|"]
    for name in _ordered(c, CACHE_ORDER):
        x = c[name]
        lines.append(f"| cache-{name} | {x['sequences']:,} | {x['tokens']:,} | {x['bytes']:,} | "
                     f"{x['bytes_per_token']:.1f} | {x['bytes_per_supervised_token']:.1f} |")
    mi = report["machine"]
    lines += ["", f"Machine: {mi['cpu_model'] or 'unknown CPU'}, {mi['usable_cores']} usable cores, torch "
              f"{mi['torch']} ({mi['torch_threads']} threads); load average at the end "
              f"{', '.join(f'{x:.1f}' for x in mi['loadavg'] or [])}."]
    lines += _speed_lines(report)
    if report["assets"].get("note"):
        lines += ["", f"Note: {report['assets']['note']}."]
    return "\n".join(lines) + "\n"


def _speed_lines(report: dict[str, Any]) -> list[str]:
    """The run's wall time and how fast its students stepped: what to compare first when a run on another
    machine, or at another hour, takes longer."""
    total = report["wall_s"].get("total")
    if total is None:
        return []
    per_step = [1e3 * r["train_wall_s"] / r["final"]["step"] for r in report["runs"].values()
                if r.get("train_wall_s") and r.get("final", {}).get("step")]
    line = f"Wall time of the whole run: {format_duration(total)}"
    if per_step:
        threads = report["machine"]["torch_threads"]  # the students' too: each job sets the command's count
        each = "one thread" if threads == 1 else f"{threads} threads"
        line += (f"; the students took {min(per_step):.1f} to {max(per_step):.1f} ms per step, {each} "
                 "each (training wall time over steps, their evaluations included)")
    return ["", line + "."]


# ------------------------------------------------------------------------------------------------- curves


def plot_report(report: dict[str, Any], png: Path) -> None:
    """``curves.png`` of a report: every run's curves against the teacher's values."""
    s, seeds = report["config"]["resolved"]["student"], report["config"]["resolved"]["seeds"]
    teacher = {"val_ce": report["teacher"]["val_ce"], "strict_acc": report["teacher"].get("curve_strict_acc")}
    plot_curves(report["curves"], teacher, png,
                f"KD (topk_tail, alpha {s['alpha']:g}, T {s['temperature']:g}) vs CE only: "
                f"{report['student_parameters']:,}-parameter FNet students from a "
                f"{report['assets']['teacher_parameters']:,}-parameter Qwen2 teacher, seeds "
                f"{', '.join(map(str, seeds))} (thin: per seed; band: min-max)")


def _band(ax, points_by_seed: list[list[tuple[float, float]]], color: str, label: str) -> None:
    """Thin line per seed, and the mean over seeds with a min-max band where every seed has the step."""
    for pts in points_by_seed:
        if pts:
            ax.plot(*zip(*pts), "-", color=color, alpha=0.3, lw=0.8)
    common = sorted(set.intersection(*(set(x for x, _ in pts) for pts in points_by_seed))) \
        if points_by_seed else []
    if not common:
        return
    ys = [[dict(pts)[x] for pts in points_by_seed] for x in common]
    ax.plot(common, [statistics.fmean(y) for y in ys], "o-", color=color, lw=2, ms=3,
            label=f"{label} (mean of {len(points_by_seed)})")
    ax.fill_between(common, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.15)


def plot_curves(curves: dict[str, list[dict[str, list]]], teacher: dict[str, Any], png: Path,
                title: str) -> None:
    """2 x 2: validation CE and exact-answer accuracy against steps (per seed thin, mean with a min-max
    band, the teacher dashed), and the paired KD - CE difference of each (per seed and mean)."""
    fig = Figure(figsize=(12, 8))
    axes = fig.subplots(2, 2, sharex=True)
    colors = {"kd": "tab:blue", "ce": "tab:orange", WRITTEN: "tab:purple"}
    panels = (("val_ce", "validation label CE (nats / supervised token)", teacher.get("val_ce")),
              ("strict_acc", "exact-answer accuracy (strict, first test problems)",
               teacher.get("strict_acc")))
    for col, (key, ylabel, t_value) in enumerate(panels):
        ax, dax = axes[0, col], axes[1, col]
        for m in [m for m in (*METHODS, WRITTEN) if m in curves]:
            _band(ax, [c[key] for c in curves[m]], colors[m], METHOD_NAMES[m])
        if t_value is not None:
            ax.axhline(t_value, color="gray", ls="--", lw=1.2, label="teacher")
        if key == "val_ce":
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        for m, color in (("kd", "tab:green"), (WRITTEN, "tab:purple")):
            if m not in curves:
                continue
            diffs = []
            for kd, ce in zip(curves[m], curves["ce"]):
                ce_at = dict(ce[key])
                diffs.append([(x, y - ce_at[x]) for x, y in kd[key] if x in ce_at])
            _band(dax, diffs, color, f"{METHOD_NAMES[m]} - CE only")
        dax.axhline(0.0, color="black", lw=0.8)
        dax.set_ylabel(f"minus CE only: {'val CE' if key == 'val_ce' else 'accuracy'}"
                       f" ({'lower' if key == 'val_ce' else 'higher'} is better for KD)")
        dax.set_xlabel("optimizer step")
        dax.grid(alpha=0.3)
        if dax.get_legend_handles_labels()[0]:
            dax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(png, buf.getvalue())
