"""student.progress: plain interval lines (no carriage returns) when the stream is not a terminal, a tqdm bar
on one, nothing with --no-progress; and teacher-cache's progress in a log file."""

from __future__ import annotations

import io
import sys

import pytest

from student import progress as progress_mod
from student.progress import Progress, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_mod.time, "perf_counter", c)
    return c


def test_one_plain_line_per_interval_of_units(clock):
    out = io.StringIO()
    with Progress(100, desc="train", unit="step", every=10, every_seconds=float("inf"), stream=out) as p:
        for i in range(100):
            clock.t += 0.5
            p.update(1, tokens=200, loss=3.0 - i / 100)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # at 10, 20, ..., 100; nothing new to say at close
    assert lines[0] == "train 10/100 step (10%)  loss 2.91  400 tok/s  elapsed 5s  ETA 45s"
    assert lines[-1].startswith("train 100/100 step (100%)  loss 2.01  400 tok/s  elapsed 50s")
    assert "ETA" not in lines[-1]


def test_one_plain_line_per_interval_of_seconds_and_a_last_line(clock):
    out = io.StringIO()
    p = Progress(1000, desc="teacher", unit="seq", initial=400, every_seconds=30, stream=out)
    for _ in range(95):  # 2 s per update: lines at 30, 60, 90, 120, 150, 180 s; the rest at close
        clock.t += 2.0
        p.update(1)
    p.close()
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 7 and "\r" not in out.getvalue()
    # ETA from the units done in this run (a resumed run counts from `initial`)
    assert lines[0] == "teacher 415/1,000 seq (42%)  elapsed 30s  ETA 19m30s"
    assert lines[-1].startswith("teacher 495/1,000 seq (50%)  elapsed 3m10s")


def test_disabled_writes_nothing_and_a_terminal_gets_a_bar(clock):
    out = io.StringIO()
    with Progress(10, desc="eval", enabled=False, every=1, stream=out) as p:
        for _ in range(10):
            p.update(1)
    assert out.getvalue() == ""
    tty = io.StringIO()
    with Progress(10, desc="eval", unit="ex", stream=tty, tty=True) as p:
        for _ in range(10):
            p.update(1, tokens=5)
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue()


def test_environment_sets_the_default_interval(monkeypatch):
    monkeypatch.setenv("FNET_PROGRESS_SECONDS", "5")
    assert Progress(1, desc="x", stream=io.StringIO()).every_seconds == 5.0
    assert [format_duration(s) for s in (0, 59.4, 61, 3600 * 2 + 7 * 60)] == ["0s", "59s", "1m01s", "2h07m"]


def run_cli(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_teacher_cache_progress_in_a_log_file(tmp_path, tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice,
                                              monkeypatch, capsys):
    """stderr not a terminal (as in a log file): plain lines, no carriage returns; --no-progress keeps the
    summary."""
    base = ["teacher-cache", "--teacher", str(tiny_qwen_dir), "--tokenizer", str(qwen_tokenizer_dir),
            "--dataset", str(gsm8k_slice), "--topk", "4", "--limit", "4", "--unit-size", "2",
            "--batch-tokens", "512", "--device", "cpu"]
    monkeypatch.setenv("FNET_PROGRESS_SECONDS", "0")
    code, out, err = run_cli(monkeypatch, capsys, [*base, "--out", str(tmp_path / "a")])
    assert code == 0, err
    progress = [ln for ln in err.splitlines() if ln.startswith("teacher ")]
    assert "\r" not in out + err
    assert progress and progress[-1].startswith("teacher 4/4 seq (100%)") and "tok/s" in progress[-1]
    assert "teacher cache written to" in out

    code, out, err = run_cli(monkeypatch, capsys, [*base, "--out", str(tmp_path / "b"), "--no-progress"])
    assert code == 0, err
    assert not [ln for ln in err.splitlines() if ln.startswith("teacher ")]
    assert "teacher cache written to" in out
