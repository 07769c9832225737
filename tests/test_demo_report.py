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
