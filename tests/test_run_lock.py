"""One writer per run folder: the flock run lock of train-student (``cache.util.lock_run_folder``), with real
processes: a second trainer, fresh or ``--resume``, is refused in one line naming the holder while the first
runs (in both orders of start); a holder killed with -9 leaves no stale lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.util import RUN_LOCK, FolderLock, Locked, UserError, lock_run_folder
from student.train import CHECKPOINT, FINAL, METRICS, TrainConfig, setup, train_student

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, dropout=0.1, steps=6,
            batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0, save_every=2, log_every=1,
            num_workers=0, progress=False, chunk_size=64, val_fraction=0.2)

# A trainer that stops (holding its run lock) after step HOLD_AT: it prints HOLDING and sleeps.
HOLDER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from student.train import TrainConfig, TrainHooks, train_student
args = json.loads(sys.argv[1])
def after_step(step):
    if step == args["hold_at"]:
        print("HOLDING", flush=True)
        time.sleep(600)
train_student(TrainConfig(**args["cfg"]), TrainHooks(after_step=after_step))
"""


def start_holder(cfg: dict, hold_at: int, stderr) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    payload = json.dumps({"cfg": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()},
                          "hold_at": hold_at})
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, payload], env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "HOLDING", f"the holder exited with {proc.wait()}"
    return proc


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def steps_logged(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / METRICS).read_text().splitlines()
            if ln.strip() and json.loads(ln)["event"] == "train"]


def cli(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    return info.value.code, capsys.readouterr().err


def cli_args(cache: Path, out: Path) -> list[str]:
    return ["train-student", "--cache", str(cache), "--out", str(out), "--hidden-size", "16", "--layers", "1",
            "--ffn", "32", "--window", "4", "--max-positions", "64", "--steps", "6", "--batch-tokens", "96",
            "--lr", "3e-3", "--min-lr", "3e-4", "--warmup", "1", "--eval-every", "0", "--save-every", "2",
            "--log-every", "1", "--num-workers", "0", "--no-progress", "--chunk-size", "64",
            "--val-fraction", "0.2"]


def test_a_second_trainer_is_refused_while_one_runs_in_both_orders_and_kill_9_frees_the_folder(
        tmp_path, monkeypatch, capsys):
    cache = write_bigram_cache(tmp_path / "cache")
    out = tmp_path / "run"
    fresh = TrainConfig(cache=cache, out=out, **TINY)
    resume = TrainConfig(cache=cache, out=out, resume=True, **TINY)
    with open(tmp_path / "stderr", "w") as err:
        # 1. a fresh run holds the fresh folder (no checkpoint yet): a second fresh run and a --resume are
        # refused, both by the lock
        first = start_holder(dict(cache=cache, out=out, **TINY), hold_at=1, stderr=err)
        try:
            holder = rf"pid {first.pid} on host {socket.gethostname()}, started \d{{4}}-\d\d-\d\d "
            busy = rf"^{out} is in use by another train-student process \({holder}"
            with pytest.raises(Locked, match=busy):
                train_student(fresh)
            code, stderr = cli([*cli_args(cache, out), "--resume"], monkeypatch, capsys)
            assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
            assert f"pid {first.pid} on host" in stderr and "choose another output folder" in stderr
            assert steps_logged(out) == [1]  # the refused runs wrote nothing
        finally:
            kill9(first)

        # 2. killed with -9: the kernel dropped the lock, so the next run starts at once; it holds the
        # folder in turn (past its step-2 checkpoint, with DataLoader workers forked after it took the lock)
        # and both kinds of start are refused again
        t0 = time.perf_counter()
        second = start_holder(dict(cache=cache, out=out, **{**TINY, "num_workers": 2}), hold_at=3, stderr=err)
        try:
            assert time.perf_counter() - t0 < 60
            with pytest.raises(Locked, match=f"pid {second.pid} on host"):
                train_student(fresh)
            with pytest.raises(Locked, match=f"pid {second.pid} on host"):
                setup(resume)
        finally:
            kill9(second)
    # no stale lock after the second kill either, although its workers die a moment after it: resumes from
    # step 2 at once
    result = train_student(resume)
    assert result.final_metrics["step"] == 6 and (out / FINAL / "model.safetensors").is_file()
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]  # each step logged once
    assert (out / RUN_LOCK).is_file() and (out / CHECKPOINT).is_dir()


def test_folder_lock_within_one_process(tmp_path):
    lock = lock_run_folder(tmp_path / "run", "study")
    assert (tmp_path / "run" / RUN_LOCK).is_file()
    info = json.loads((tmp_path / "run" / RUN_LOCK).read_text())
    assert info["pid"] == os.getpid() and info["command"] == "study"
    busy = rf"in use by another study process \(pid {os.getpid()} on host .*: study\)"
    with pytest.raises(Locked, match=busy):
        lock_run_folder(tmp_path / "run", "study")  # another open file: flock refuses it
    lock.release(remove=True)
    assert not (tmp_path / "run" / RUN_LOCK).exists()
    with FolderLock(tmp_path / "run" / RUN_LOCK, busy="busy", advice="wait") as again:
        assert again.held
    assert not again.held
    assert issubclass(Locked, UserError)


def test_a_refused_start_leaves_no_folder_behind(tmp_path):
    cache = write_bigram_cache(tmp_path / "cache", n=6)
    out = tmp_path / "never"
    with pytest.raises(UserError, match="no checkpoint"):
        setup(TrainConfig(cache=cache, out=out, resume=True, **TINY))
    assert not out.exists()
    out.mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        setup(TrainConfig(cache=cache, out=out, resume=True, **TINY))
    assert out.is_dir() and not lock_run_folder(out, "x").release()  # the lock was released


def test_the_study_refuses_a_folder_another_study_holds(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import study_cache_size as study

    with lock_run_folder(tmp_path, "study"):
        busy = rf"^{tmp_path} is in use by another study process \(pid {os.getpid()}"
        with pytest.raises(Locked, match=busy):
            study.main(["--out", str(tmp_path), "--quick", "--threads", "0"])
    assert not (tmp_path / "assets").exists()  # refused before building anything


# Holds a run lock, forks a child that outlives it (as a DataLoader worker may for a moment), says READY.
FORKER = r"""
import os, sys, time
from cache.util import lock_run_folder
lock = lock_run_folder(sys.argv[1], "train-student")
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
print("READY", child, flush=True)
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", FORKER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            text=True)
    ready, child = proc.stdout.readline().split()
    try:
        assert ready == "READY"
        with pytest.raises(Locked, match=f"pid {proc.pid} on host"):
            lock_run_folder(tmp_path, "train-student")
        kill9(proc)
        os.kill(int(child), 0)  # the child still runs
        lock_run_folder(tmp_path, "train-student").release()  # and the folder is free
    finally:
        kill9(proc)
        os.kill(int(child), signal.SIGKILL)
