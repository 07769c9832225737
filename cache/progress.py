"""Progress of a long loop, readable both on a terminal and in a log file.

On a terminal a tqdm bar redraws in place. When the stream is not a terminal (``> log``, SLURM, CI) a bar's
carriage-return redraws pile up into one enormous line, so ``Progress`` writes one plain line instead at
every multiple of ``every`` units and whenever ``every_seconds`` seconds have passed since the last line, and
one at the end (the values shown are those of the latest ``update``, never older)::

    train 120/2000 step (6%)  loss 3.412  12,345 tok/s  elapsed 1m02s  ETA 16m20s

Usage (the caller's own summary lines are not affected by ``enabled=False``, i.e. ``--no-progress``)::

    with Progress(total=steps, desc="train", unit="step", initial=start_step, enabled=show) as p:
        for ...:
            p.update(1, tokens=n_tokens, loss=loss)   # keyword values are shown as they are last given

``FNET_PROGRESS_SECONDS`` overrides the default ``every_seconds`` (30) for log files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_SECONDS = 30.0


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class Progress:
    """A progress reporter: a tqdm bar on a terminal, plain interval lines otherwise, nothing when disabled.

    ``total``: units expected in all (``initial`` of them already done, e.g. on resume); ``desc``: the line's
    first word; ``unit``: what ``update`` counts (step, ex, tok, ...). ``every``: write a plain line at least
    every this many units (``None``: by time only); ``every_seconds``: and at least this often. ``stream``
    (default stderr) and ``tty`` (default ``stream.isatty()``) choose the form.
    """

    def __init__(self, total: int, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every: int | None = None, every_seconds: float | None = None, stream: TextIO | None = None,
                 tty: bool | None = None):
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.n = self.initial = int(initial)
        self.tokens = 0
        self.shown: dict[str, Any] = {}
        self.stream = stream if stream is not None else sys.stderr
        if every_seconds is None:
            every_seconds = float(os.environ.get("FNET_PROGRESS_SECONDS", DEFAULT_SECONDS))
        self.every, self.every_seconds = every, every_seconds
        self.t0 = self._last_t = time.perf_counter()
        self._last_n = self.n
        self._bar = None
        self._closed = False
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if enabled and tty:
            # disable=False: TQDM_DISABLE (set for libraries' bars in a log file) must not reach our own
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, unit_scale=unit == "tok", disable=False)

    def update(self, n: int = 1, *, tokens: int = 0, **shown: Any) -> None:
        """``n`` more units done (``tokens`` more tokens processed); keyword values replace the shown ones."""
        self.n += n
        self.tokens += tokens
        self.shown.update(shown)
        if not self.enabled:
            return
        if self._bar is not None:
            post = {k: _show(v) for k, v in self.shown.items()}
            if self.tokens:
                post["tok/s"] = f"{self.tokens_per_second():,.0f}"
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        # at each multiple of `every` (so a resumed run and a time-triggered line keep the same rhythm)
        if ((self.every is not None and self.n // self.every > self._last_n // self.every)
                or now - self._last_t >= self.every_seconds):
            self._write(now)

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def line(self, now: float | None = None) -> str:
        """The plain line for the current state."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.t0
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc} {self.n:,}/{self.total:,} {self.unit}{pct}"]
        parts += [f"{k} {_show(v)}" for k, v in self.shown.items()]
        if self.tokens:
            parts.append(f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        done = self.n - self.initial
        if self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) * elapsed / done) if done else '?'}")
        return "  ".join(parts)

    def _write(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self._last_t, self._last_n = now, self.n

    def write(self, message: str) -> None:
        """Print a message line without breaking the bar (a plain print otherwise)."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish: close the bar, or write the last plain line if anything happened since the previous one."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.n != self._last_n:
            self._write(time.perf_counter())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
