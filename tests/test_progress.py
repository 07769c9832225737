"""cache.progress: plain interval lines (no carriage returns) when the stream is not a terminal, a tqdm bar
on one, nothing with --no-progress; and teacher-cache's progress in a log file."""

from __future__ import annotations

import io
import sys

import pytest

from cache import progress as progress_mod
from cache.progress import Progress, format_duration


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


# ------------------------------------------------------------------------------ a training run's log file


def test_each_progress_line_carries_the_loss_of_its_step(tmp_path, capsys, monkeypatch):
    """A line every step (FNET_PROGRESS_SECONDS=0) with --log-every 2: at a logged step the line's loss is
    metrics.jsonl's; at the step between, the loss of that very step (read from a --log-every 1 run, which
    trains identically), never the last logged value. Evaluations print one line each with the elapsed
    time."""
    import json

    from helpers import write_bigram_cache

    from student.train import METRICS, TrainConfig, train_student

    cache = write_bigram_cache(tmp_path / "cache")
    tiny = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, steps=4, batch_tokens=96,
                lr=3e-3, warmup=1, eval_every=2, save_every=0, num_workers=0, chunk_size=64,
                val_fraction=0.2)

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / METRICS).read_text().splitlines())
                if r["event"] == "train"}

    train_student(TrainConfig(cache=cache, out=tmp_path / "every", log_every=1, progress=False, **tiny))
    per_step = losses(tmp_path / "every")
    capsys.readouterr()
    monkeypatch.setenv("FNET_PROGRESS_SECONDS", "0")
    train_student(TrainConfig(cache=cache, out=tmp_path / "log", log_every=2, progress=True, **tiny))
    err = capsys.readouterr().err
    logged = losses(tmp_path / "log")
    assert sorted(logged) == [2, 4] and "\r" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("train ")]
    assert [ln.split()[1] for ln in lines] == ["1/4", "2/4", "3/4", "4/4"]
    shown = {int(ln.split()[1].split("/")[0]): ln.split("  loss ")[1].split()[0] for ln in lines}
    assert shown == {1: f"{per_step[1]:.4g}", 2: f"{logged[2]:.4g}", 3: f"{per_step[3]:.4g}",
                     4: f"{logged[4]:.4g}"}
    assert shown[2] != shown[3] and per_step[3] != logged[2]
    assert all("tok/s" in ln for ln in lines) and all("ETA" in ln for ln in lines[:-1])
    evals = [ln for ln in err.splitlines() if ln.startswith("eval step ")]
    assert [ln.split(":")[0] for ln in evals] == ["eval step 0", "eval step 2", "eval step 4"]
    assert all("val CE" in ln and "top-1 agreement" in ln and ", elapsed " in ln for ln in evals)


LIBRARY_BAR_MARKS = ("\r", "Loading weights", "it/s]", "\u2588", "\u258f")  # redraws, tqdm's blocks


def test_no_library_bars_in_a_log_file(tmp_path, tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice,
                                      monkeypatch, capsys):
    """Each command with stderr not a terminal (as in `cmd 2> log`): our plain progress lines, and none of
    the libraries' bars (transformers' "Loading weights", hub or datasets bars, carriage returns), although
    the libraries start with their bars on."""
    import warnings

    import datasets
    import huggingface_hub
    from transformers.utils import logging as hf_logging

    def bars_on() -> None:
        hf_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
        with warnings.catch_warnings():  # datasets keeps the variable it saw at import, if it was set then
            warnings.simplefilter("ignore")
            datasets.enable_progress_bars()

    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)  # unset now, restored to what it was afterwards
    bars_on()
    monkeypatch.setenv("FNET_PROGRESS_SECONDS", "0")

    def run(*args: str) -> str:
        code, _, err = run_cli(monkeypatch, capsys, list(args))
        assert code == 0, err
        for mark in LIBRARY_BAR_MARKS:
            assert mark not in err, (args[0], mark, err)
        return err

    try:
        cache, run_dir = tmp_path / "cache", tmp_path / "run"
        err = run("teacher-cache", "--teacher", str(tiny_qwen_dir), "--tokenizer", str(qwen_tokenizer_dir),
                  "--dataset", str(gsm8k_slice), "--limit", "4", "--topk", "4", "--unit-size", "2",
                  "--batch-tokens", "1024", "--device", "cpu", "--out", str(cache))
        assert "teacher 4/4 seq (100%)" in err
        err = run("train-student", "--cache", str(cache), "--val-cache", str(cache), "--out", str(run_dir),
                  "--hidden-size", "16", "--layers", "1", "--ffn", "32", "--window", "4", "--steps", "2",
                  "--batch-tokens", "1024", "--compact-vocab", "--num-workers", "0", "--log-every", "1",
                  "--eval-every", "1", "--device", "cpu")
        assert "train 2/2 step (100%)" in err and "eval step 1:" in err
        run("generate", "--model", str(run_dir / "final"), "--prompt", "2+2?", "--max-new-tokens", "4",
            "--device", "cpu")
        err = run("eval", "--model", str(run_dir / "final"), "--dataset", str(gsm8k_slice), "--limit", "2",
                  "--max-new-tokens", "4", "--device", "cpu")
        assert "eval 2/2 ex (100%)" in err
    finally:
        for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            monkeypatch.delenv(name, raising=False)  # set by the commands; restored afterwards
        bars_on()
