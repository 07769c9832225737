"""``metrics.jsonl`` (one JSON object per training-log or evaluation event), its plot ``curves.png`` and,
with ``--report-to tensorboard``, the same numbers as TensorBoard scalars in ``tensorboard/``."""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cache.util import UserError, atomic_write_bytes

METRICS = "metrics.jsonl"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
PLOT_INTERVAL_S = 60.0  # curves.png is redrawn at an evaluation at most this often, and always at the end


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per log or eval event) and its ``curves.png``; rank 0 only.

    ``keep_until_step``: a resumed run keeps what was logged up to its checkpoint's step and drops the rest
    (the resumed run logs those steps again), so no line is duplicated or lost; ``None`` starts afresh.
    ``tensorboard``: every numeric field of every record also goes to TensorBoard as ``EVENT/FIELD`` at its
    step (events after the checkpoint's step are purged on resume, as in ``metrics.jsonl``)."""

    def __init__(self, out: Path, enabled: bool, keep_until_step: int | None, tensorboard: bool = False):
        self.path, self.png, self.enabled = out / METRICS, out / CURVES, enabled
        self.tb = None
        self._last_plot = time.monotonic()  # the first redraw comes PLOT_INTERVAL_S in (or at the end)
        if not enabled:
            return
        if keep_until_step is None:
            atomic_write_bytes(self.path, b"")
        elif self.path.exists():  # a resumed run drops what the interrupted run logged after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _line_step(ln) is not None and _line_step(ln) <= keep_until_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())
        if tensorboard:
            self.tb = _tensorboard_writer(out / TENSORBOARD, keep_until_step)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{record['event']}/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

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


def _tensorboard_writer(folder: Path, keep_until_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install 'fnet-distill[tensorboard]'), or drop --report-to") from None
    if keep_until_step is None:
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run, like metrics.jsonl
    # SummaryWriter opens its event file in a writer thread: a folder it cannot write fails there, and that
    # thread's traceback would follow the one-line error at exit. Try the folder here first.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"--report-to tensorboard cannot write to {folder} ({e.strerror or e}); fix its "
                        "permissions or drop --report-to") from None
    if keep_until_step is None:
        return SummaryWriter(str(folder))
    return SummaryWriter(str(folder), purge_step=keep_until_step + 1)


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
