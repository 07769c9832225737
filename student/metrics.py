"""``metrics.jsonl`` (one JSON object per training-log or evaluation event) and its plot ``curves.png``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from cache.util import atomic_write_bytes

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per log or eval event) and its ``curves.png``; rank 0 only."""

    def __init__(self, out: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.png, self.enabled = out / METRICS, out / CURVES, enabled
        if not enabled:
            return
        if keep_until_step is None:
            atomic_write_bytes(self.path, b"")
        elif self.path.exists():  # a resumed run drops what the interrupted run logged after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _line_step(ln) is not None and _line_step(ln) <= keep_until_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def last(self, event: str) -> dict[str, Any]:
        """The last record of this event kind (``train`` or ``eval``), {} if none (or not rank 0)."""
        if not (self.enabled and self.path.exists()):
            return {}
        for ln in reversed(self.path.read_text().splitlines()):
            if ln.strip() and json.loads(ln).get("event") == event:
                return json.loads(ln)
        return {}

    def plot(self) -> None:
        if self.enabled:
            plot_curves(self.path, self.png)


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
