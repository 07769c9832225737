"""``metrics.jsonl`` (one JSON object per training-log or evaluation event) and its plot ``curves.png``;
with ``--report-to``, the same numbers go to the trackers of ``student.reporting`` (TensorBoard, W&B)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cache.util import atomic_write_bytes
from student.reporting import TENSORBOARD, Reporter

METRICS = "metrics.jsonl"
CURVES = "curves.png"
PLOT_INTERVAL_S = 60.0  # curves.png is redrawn at an evaluation at most this often, and always at the end

__all__ = ["CURVES", "METRICS", "TENSORBOARD", "MetricsLog", "plot_curves"]


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per log or eval event) and its ``curves.png``; rank 0 only.

    ``keep_until_step``: a resumed run keeps what was logged up to its checkpoint's step and drops the rest
    (the resumed run logs those steps again), so no line is duplicated or lost; ``None`` starts afresh.
    ``reporters``: every record also goes to each of them (``student.reporting.open_reporters``); they are
    closed with the log."""

    def __init__(self, out: Path, enabled: bool, keep_until_step: int | None,
                 reporters: Sequence[Reporter] = ()):
        self.path, self.png, self.enabled = out / METRICS, out / CURVES, enabled
        self.reporters = list(reporters)
        self._last_plot = time.monotonic()  # the first redraw comes PLOT_INTERVAL_S in (or at the end)
        if not enabled:
            return
        if keep_until_step is None:
            atomic_write_bytes(self.path, b"")
        elif self.path.exists():  # a resumed run drops what the interrupted run logged after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _line_step(ln) is not None and _line_step(ln) <= keep_until_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        for reporter in self.reporters:
            reporter.log(record)

    def close(self) -> None:
        """Close the reporters (each once; a tracker flushes its last events here)."""
        reporters, self.reporters = self.reporters, []
        for reporter in reporters:
            reporter.close()

    def last(self, event: str) -> dict[str, Any]:
        """The last record of this event kind (``train`` or ``eval``), {} if none (or not rank 0)."""
        if not (self.enabled and self.path.exists()):
            return {}
        for ln in reversed(self.path.read_text().splitlines()):
            if ln.strip() and json.loads(ln).get("event") == event:
                return json.loads(ln)
        return {}

    def plot(self, force: bool = False) -> None:
        """Redraw ``curves.png``; without ``force`` at most once per ``PLOT_INTERVAL_S`` (a redraw costs
        about a second of matplotlib, as much as many small-model steps)."""
        now = time.monotonic()
        if self.enabled and (force or now - self._last_plot >= PLOT_INTERVAL_S):
            plot_curves(self.path, self.png)
            self._last_plot = time.monotonic()


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def plot_curves(metrics: Path, png: Path) -> None:
    """Training loss/CE/KD and validation CE/KL against steps; top-1 agreement on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if r.get("event") == "train"]
    val = [r for r in rows if r.get("event") == "eval"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("ce", "--"), ("kd", ":")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=f"train {key}")
    for key, style in (("val_ce", "o-"), ("val_kl", "s-")):
        pts = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per supervised token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    for key, rs in (("top1_agree", train), ("val_top1_agree", val), ("val_label_acc", val)):
        pts = [(r["step"], r[key]) for r in rs if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), label=key.replace("_", " ") if key.startswith("val") else f"train {key}")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("fraction of supervised tokens")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())
