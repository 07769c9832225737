"""Experiment trackers for ``train-student --report-to``: every ``metrics.jsonl`` record also goes to
TensorBoard (``OUT/tensorboard/``) and/or Weights & Biases (``OUT/wandb/``), through one small interface::

    reporter.log(record)   # a metrics.jsonl record: {"event": "train" | "eval", "step": N, field: value, ...}
    reporter.close()

Each numeric field is reported as ``EVENT/FIELD`` (``train/loss``, ``eval/val_ce``) at the record's step.
Only rank 0 reports (``MetricsLog`` opens the reporters there). A tracker's package is imported only when it
is asked for; a missing one is one line naming the pip command.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Protocol

from cache.util import UserError, atomic_write_bytes

REPORT_TO = ("none", "tensorboard", "wandb")
TRACKERS = REPORT_TO[1:]
TENSORBOARD = "tensorboard"
WANDB = "wandb"
WANDB_RUN_ID = "run-id"  # OUT/wandb/run-id: the W&B run that --resume continues
WANDB_PROJECT = "fnet-distill"  # the default project when neither --wandb-project nor WANDB_PROJECT is set


def parse_report_to(text: str) -> tuple[str, ...]:
    """``none`` -> (); ``tensorboard``, ``wandb`` or a comma list of both -> the trackers, in that order."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    wrong = [t for t in names if t not in REPORT_TO]
    if wrong or not names or ("none" in names and len(names) > 1):
        raise UserError(f"--report-to must be one of {'|'.join(REPORT_TO)}, or tensorboard,wandb for both "
                        f"(got {text!r})")
    return tuple(t for t in TRACKERS if t in names)


class Reporter(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields as ``EVENT/FIELD`` -> value (``step`` and booleans left out)."""
    return {f"{record['event']}/{k}": v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _try_folder(folder: Path, flag: str) -> None:
    # Trackers open their files in writer threads or processes: a folder they cannot write fails there, and
    # that traceback would follow the one-line error at exit. Try the folder here first.
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{flag} cannot write to {folder} ({e.strerror or e}); fix its permissions or drop "
                        "--report-to") from None


class TensorBoardReporter:
    """Scalars in ``OUT/tensorboard/``; on resume the events after the checkpoint's step are purged, as the
    resumed run logs those steps again (like ``metrics.jsonl``)."""

    def __init__(self, folder: Path, keep_until_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pip install 'fnet-distill[tensorboard]'), or drop --report-to") from None
        if keep_until_step is None:
            shutil.rmtree(folder, ignore_errors=True)  # a fresh run, like metrics.jsonl
        _try_folder(folder, "--report-to tensorboard")
        purge = {} if keep_until_step is None else {"purge_step": keep_until_step + 1}
        self.writer = SummaryWriter(str(folder), **purge)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run kept in ``OUT/wandb/`` (``WANDB_MODE=offline`` keeps it there for a later
    ``wandb sync``); its config is the resolved run config. ``--resume`` continues the same W&B run (its id
    is kept in ``OUT/wandb/run-id``); W&B cannot drop history, so the steps an interrupted run logged after
    its checkpoint appear twice there (``metrics.jsonl`` and TensorBoard keep one copy)."""

    def __init__(self, out: Path, config: dict[str, Any], *, project: str | None, name: str | None,
                 resume: bool):
        try:
            import wandb
        except ImportError:
            raise UserError("--report-to wandb needs the wandb package: pip install wandb (or pip install "
                            "'fnet-distill[wandb]'), or drop --report-to") from None
        folder = out / WANDB
        _try_folder(folder, "--report-to wandb")
        id_file = folder / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        # console off: the process's own stdout/stderr stay untouched (no capture threads, no redirected
        # file descriptors); quiet in a log file: no sparkline summary at the end.
        settings = wandb.Settings(console="off", quiet=not _isatty(sys.stderr))
        try:
            self.run = wandb.init(project=project or os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                                  name=name or out.resolve().name, dir=str(out), config=config, id=run_id,
                                  resume="allow" if run_id else None, settings=settings)
        except Exception as e:  # wandb raises its own error types for a missing login, a bad project, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--report-to wandb could not start a run ({first}); run `wandb login`, or set "
                            "WANDB_MODE=offline to keep the run in OUT/wandb/ for a later `wandb sync`"
                            ) from None
        atomic_write_bytes(id_file, self.run.id.encode())
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # our step is the x-axis, not W&B's own counter

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({**scalars(record), "step": record["step"]})

    def close(self) -> None:
        self.run.finish()


def _isatty(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def open_reporters(report_to: str, out: Path, keep_until_step: int | None, config: dict[str, Any], *,
                   wandb_project: str | None = None, run_name: str | None = None) -> list[Reporter]:
    """The trackers ``report_to`` names (``parse_report_to``), opened for the run in ``out``;
    ``keep_until_step``: the checkpoint's step on resume, None for a fresh run."""
    reporters: list[Reporter] = []
    try:
        for name in parse_report_to(report_to):
            if name == TENSORBOARD:
                reporters.append(TensorBoardReporter(out / TENSORBOARD, keep_until_step))
            else:
                reporters.append(WandbReporter(out, config, project=wandb_project, name=run_name,
                                               resume=keep_until_step is not None))
    except BaseException:
        for r in reporters:
            r.close()
        raise
    return reporters
