"""SIGINT and SIGTERM, with real processes: ``fnet-distill train-student`` stops at the end of the step in
progress with a checkpoint and one line giving the ``--resume`` command (exit 130 / 143), and the printed
command finishes the run equal, bit for bit, to an uninterrupted one; two signals exit at once and leave the
previous checkpoint resumable; ``teacher-cache`` keeps its committed units and prints the rerun command."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest
from test_train_crash import metric_lines, params_of

from cache.reader import open_cache
from student.checkpoint import MANIFEST, folder_problem
from student.train import CHECKPOINT, FINAL, METRICS, TRAINER_STATE, TrainConfig, train_student

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "pipeline" / "demo" / "pretrained" / "teacher"
# ~5 ms a step here: long enough to be signalled mid-run after a few logged steps, a second or two in all
TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, dropout=0.1, steps=400,
            batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0, save_every=0, log_every=1,
            num_workers=0, progress=False, chunk_size=64, val_fraction=0.2)
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def cli() -> list[str]:
    script = Path(sys.executable).parent / "fnet-distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def train_args(cache: Path, out: Path, **over) -> list[str]:
    args = ["train-student", "--cache", str(cache), "--out", str(out), "--no-progress"]
    for key, value in {**TINY, **over}.items():
        if key != "progress":
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.01)


def logged_steps(out: Path) -> int:
    try:
        return sum(1 for ln in (out / METRICS).read_text().splitlines() if '"event": "train"' in ln)
    except FileNotFoundError:
        return 0


def assert_equal_runs(out: Path, reference: Path) -> None:
    ref, got = params_of(reference / FINAL), params_of(out / FINAL)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)

    def values(folder: Path) -> list[tuple]:  # everything but the timings
        return [(m["event"], m["step"], m.get("loss"), m.get("ce"), m.get("kd"), m.get("grad_norm"),
                 m.get("tokens"), m.get("val_ce"), m.get("val_kl")) for m in metric_lines(folder)]

    assert values(out) == values(reference)


def run_printed(command: str) -> subprocess.CompletedProcess:
    res = subprocess.run(shlex.split(command), env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_bigram_cache(tmp_path_factory.mktemp("bigram") / "cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """An uninterrupted run of TINY, in this process."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_student(TrainConfig(cache=cache, out=out, **TINY))
    return out


# SIGINT as a terminal's Ctrl-C sends it: to the whole process group, DataLoader workers included (they
# ignore it; the trainer stops them); SIGTERM to the trainer alone, as `kill PID` does.
@pytest.mark.parametrize("sig, group, workers", [(signal.SIGINT, True, 2), (signal.SIGTERM, False, 0)],
                         ids=["SIGINT-group", "SIGTERM"])
def test_a_signal_saves_the_step_and_the_printed_resume_command_finishes_equal(tmp_path, cache, reference,
                                                                             sig, group, workers):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli() + train_args(cache, out, num_workers=workers), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(proc, lambda: logged_steps(out) >= 3, "3 logged steps")
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT[sig], err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    step = logged_steps(out)
    assert 3 <= step < TINY["steps"]
    assert line.startswith(f"train-student: stopped by {sig.name} after step {step} of {TINY['steps']}; "
                           f"saved {out / CHECKPOINT} (step {step}); resume with: "), line
    command = line.split("resume with: ", 1)[1]
    assert shlex.split(command)[-1] == "--resume" and f"--out {out}" in command
    # the step reached, atomic and whole: manifest, hashes, trainer state, no hidden leftovers
    assert json.loads((out / CHECKPOINT / MANIFEST).read_text())["step"] == step
    assert folder_problem(out / CHECKPOINT) is None
    assert torch.load(out / CHECKPOINT / TRAINER_STATE, weights_only=True)["state"]["step"] == step
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not (out / FINAL).exists()

    res = run_printed(command)
    assert f"resuming at step {step}" in res.stderr
    assert_equal_runs(out, reference)


def test_a_second_signal_exits_at_once_and_the_previous_checkpoint_resumes(tmp_path, cache, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli() + train_args(cache, out, save_every=20), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, lambda: (out / CHECKPOINT / MANIFEST).exists() and logged_steps(out) >= 23,
                 "a checkpoint")
        # two signals: the first asks for a stop at the end of the step, the second exits at once (SIGINT
        # then SIGTERM, so the kernel cannot merge them into one pending signal)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT[signal.SIGTERM], err[-2000:]
    assert took < 5 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert not any("stopped by" in ln for ln in lines)  # no checkpoint of the step in progress
    line = lines[-1]
    assert line.startswith("train-student: second SIGTERM, stopped at once without saving; the last "
                           f"checkpoint, {out / CHECKPOINT} (step "), line
    saved = int(line.split("(step ", 1)[1].split(")", 1)[0])
    assert saved % 20 == 0 and saved < TINY["steps"]

    command = line.split("resume with: ", 1)[1]
    res = run_printed(command)
    assert "resuming at step" in res.stderr
    assert_equal_runs(out, reference)


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_after_the_same_step_and_the_printed_command_resumes(tmp_path,
                                                                                              cache):
    script = Path(sys.executable).parent / "fnet-distill"
    if not script.exists():
        pytest.skip("needs the installed fnet-distill script")
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    proc = subprocess.Popen(launch + train_args(cache, out), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(proc, lambda: logged_steps(out) >= 3, "3 logged steps")
        proc.send_signal(signal.SIGTERM)  # to torchrun alone: it forwards SIGTERM to both ranks
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Every rank stopped after the same step (a rank left behind would wait in a collective and the checkpoint
    # below would not be of that step). Known: now and then (about 1 run in 5 under pytest here) one rank
    # lingers after the checkpoint until torchrun's 30 s shutdown timeout sends SIGKILL; the saved run is
    # whole either way (checked below), so only the exit is late.
    assert took < 60, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("train-student: stopped by")]
    assert len(lines) == 1, err[-3000:]  # rank 0 speaks
    step = logged_steps(out)
    assert lines[0].startswith(f"train-student: stopped by SIGTERM after step {step} of {TINY['steps']}; ")
    assert json.loads((out / CHECKPOINT / MANIFEST).read_text())["step"] == step
    trainer = torch.load(out / CHECKPOINT / TRAINER_STATE, weights_only=True)
    assert trainer["state"]["step"] == step and len(trainer["rng"]) == 2
    command = lines[0].split("resume with: ", 1)[1]
    assert shlex.split(command)[:6] == launch and shlex.split(command)[-1] == "--resume"

    res = run_printed(command)
    assert f"resuming at step {step}" in res.stderr
    train = [m["step"] for m in metric_lines(out) if m["event"] == "train"]
    assert train == list(range(1, TINY["steps"] + 1))
    assert folder_problem(out / FINAL) is None


def test_teacher_cache_keeps_its_units_on_sigterm_and_the_printed_command_completes_it(tmp_path):
    if not (TEACHER / "config.json").exists():
        pytest.skip("the shipped demo teacher is missing")
    from pipeline.demo.problems import iter_problems, write_jsonl

    it = iter_problems(5, stream="tests")
    write_jsonl(tmp_path / "qa.jsonl", [next(it) for _ in range(1500)])
    out = tmp_path / "cache"
    args = ["teacher-cache", "--teacher", str(TEACHER), "--dataset", str(tmp_path / "qa.jsonl"), "--out",
            str(out), "--topk", "8", "--temperatures", "1", "--max-length", "256", "--unit-size", "25",
            "--batch-tokens", "2048", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(cli() + args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    journal = out / "journal.rank0.jsonl"
    try:
        wait_for(proc, lambda: journal.exists() and len(journal.read_text().splitlines()) >= 3,
                 "two committed units")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    kept = len(journal.read_text().splitlines()) - 1
    assert line.startswith(f"teacher-cache: stopped by SIGTERM; {kept} of 60 units are committed in {out} "
                           "and kept; rerun the same command to go on from there: "), line
    assert 2 <= kept < 60 and not (out / "manifest.json").exists()
    command = line.split("go on from there: ", 1)[1]
    assert shlex.split(command)[1:] == args

    res = run_printed(command)
    assert f"({60 - kept} written now, {kept} resumed)" in res.stdout
    assert len(open_cache(out, verify_hashes="all")) == 1500
