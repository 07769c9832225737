"""The demo's report is a function of ``report.json`` alone: a stored ``report.json`` (the default demo's,
``make demo``) renders again to exactly the markdown it holds, and draws ``curves.png``, without training or
any other file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.demo.report import plot_report, render_report

REPORT_JSON = Path(__file__).parent / "data" / "demo-report.json"


def _reversed(x: Any) -> Any:
    """``x`` with every mapping's keys in reverse order."""
    if isinstance(x, dict):
        return {k: _reversed(x[k]) for k in reversed(list(x))}
    if isinstance(x, list):
        return [_reversed(v) for v in x]
    return x


def test_a_stored_report_json_renders_to_its_markdown():
    report = json.loads(REPORT_JSON.read_text())
    md = report["markdown"]
    assert md.startswith("# fnet-distill demo report (embedded default)")
    assert render_report(report) == md
    # the rows keep the order the run wrote them in, whatever order the file holds its keys in
    assert render_report(_reversed(report)) == md


def test_a_stored_report_json_draws_the_curves(tmp_path):
    report = json.loads(REPORT_JSON.read_text())
    plot_report(report, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_ends_with_the_run_wall_time_and_the_students_step_times():
    report = json.loads(REPORT_JSON.read_text())
    runs = report["runs"].values()
    ms = sorted(r["train_wall_s"] / r["final"]["step"] * 1000 for r in runs)
    total = round(report["wall_s"]["total"])
    wall = f"Wall time of the whole run: {total // 60}m{total % 60:02d}s"
    last = render_report(report).rstrip("\n").splitlines()[-1]
    assert last.startswith(wall + "; ")
    assert f"took {ms[0]:.1f} to {ms[-1]:.1f} ms per step, one thread each" in last
    report["machine"]["torch_threads"] = 2  # --threads 2: the line says so
    assert "ms per step, 2 threads each" in render_report(report).rstrip("\n").splitlines()[-1]
    # a report from before the runs recorded their training time still renders, with the wall time alone
    for r in report["runs"].values():
        del r["train_wall_s"]
    assert render_report(report).rstrip("\n").splitlines()[-1] == wall + "."
