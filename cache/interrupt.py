"""SIGINT and SIGTERM for both stages: Ctrl-C, and the SIGTERM that SLURM, Kubernetes and spot instances send
before they kill.

``StopSignals`` handles both signals while a run is inside it. Immediate mode (stage one, and stage two
while it sets up) raises ``Interrupted`` from the handler: whatever is committed stays, nothing else needs
saving. Deferred mode (the training loop) only records the signal; the loop asks ``agreed()`` at each step
boundary, saves a checkpoint and raises ``Interrupted`` itself. A second signal exits at once with one line
(``os._exit``: no cleanup that could hang; atomic writes and the crash recovery keep the folder usable).

Under ``torchrun`` every worker gets the signal from the agent (it forwards SIGINT/SIGTERM to its children,
then sends SIGKILL after ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, 30 s by default); a Ctrl-C in a terminal also
reaches each worker directly, so the same signal twice within a second counts once there. ``agreed()``
all-reduces the signal (max over ranks), so every rank stops after the same step even if only one got it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_S = 1.0  # under torchrun: a terminal's Ctrl-C arrives directly and again from the agent


class Interrupted(BaseException):
    """Stopped by SIGINT or SIGTERM. ``str()`` is the one line to print; ``exit_code`` is 128 + the signal
    (130 for SIGINT, 143 for SIGTERM). A ``BaseException`` like ``KeyboardInterrupt``, so ``except Exception``
    does not swallow it (and typer does not turn it into a bare exit code)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal_name(signum)}")
        self.signum = int(signum)
        self.detailed = bool(message)  # False: raised by the handler, the caller adds where and how to go on

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: SIGINT/SIGTERM handlers while inside (main thread only; elsewhere it does nothing and
    the previous handlers stay). ``second_line(signum)`` gives the line printed when a second signal exits
    at once (empty: print nothing)."""

    def __init__(self, second_line: Callable[[int], str], *, deferred: bool = False,
                 distributed: bool = False):
        self.second_line = second_line
        self.deferred = deferred
        self.distributed = distributed
        self.received: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def defer(self) -> None:
        """From now on the first signal is only recorded (the loop stops at its next step boundary)."""
        self.deferred = True

    def _handle(self, signum: int, _frame) -> None:
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            if not self.deferred:
                raise Interrupted(signum)
            return
        if (self.distributed and signum == self.received
                and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S):
            return
        try:
            line = self.second_line(signum)
        except Exception:  # the line must never keep the process alive
            line = f"second {signal_name(signum)}: stopped at once"
        if line:
            os.write(2, (line + "\n").encode("utf-8", "replace"))
        os._exit(128 + signum)

    def agreed(self, device: torch.device) -> int | None:
        """The signal this process or any other rank received (None: go on). Under ``torch.distributed`` a
        collective: every rank must call it at the same step."""
        if not (self.distributed and torch.distributed.is_initialized()):
            return self.received
        t = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item()) or None


def ignore_stop_signals_in_worker(init: Callable[[int], None] | None, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` wrapper: workers ignore SIGINT/SIGTERM (a terminal's Ctrl-C and a
    scheduler's SIGTERM reach the whole process group); the trainer decides when to stop, and the workers
    end with it (``exit_with_parent``)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if init is not None:
        init(worker_id)


# ------------------------------------------------------------------------------------------ command lines


def _program(path: str) -> str:
    """``path`` as the user would type it: its bare name when that name on PATH is the same file."""
    name = os.path.basename(path)
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(path):
        return name
    return path


def _torchrun_prefix() -> list[str] | None:
    """The launching ``torchrun`` command line (its arguments up to the script), read from the agent's
    ``/proc/PID/cmdline`` (Linux); None where it cannot be read."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    parts = [p.decode("utf-8", "replace") for p in raw.split(b"\0") if p]
    script = os.path.realpath(sys.argv[0]) if sys.argv and sys.argv[0] else None
    for i, p in enumerate(parts):
        if script is not None and os.path.realpath(p) == script:
            prefix = parts[:i]
            if len(prefix) > 1 and os.path.basename(prefix[1]) == "torchrun":
                prefix = [_program(prefix[1]), *prefix[2:]]  # drop the interpreter of the console script
            return [*prefix, p]  # the script as torchrun was given it (it runs a path, not a PATH name)
    return None


def command_line(subcommand: str, add: Sequence[str] = ()) -> str | None:
    """This process's ``fnet-distill SUBCOMMAND ...`` command line as a shell line, with ``add`` appended
    where missing (under ``torchrun``, the whole torchrun line); None when the process is not that command (a
    library call)."""
    argv = list(sys.argv)
    if len(argv) < 2 or argv[1] != subcommand:
        return None
    args = [*argv[1:], *(a for a in add if a not in argv[1:])]
    prefix = None
    if "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ:
        prefix = _torchrun_prefix()
    if prefix is None:
        orig = list(getattr(sys, "orig_argv", []))
        if os.path.basename(argv[0]) == "__main__.py" and "-m" in orig:
            i = orig.index("-m")
            prefix = orig[:i + 2]  # python -m pipeline, as typed
        else:
            prefix = [_program(argv[0])]
    return shlex.join([*prefix, *args])
