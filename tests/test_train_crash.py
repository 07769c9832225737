"""Checkpoint integrity and crash safety of train-student, with real processes where a crash is involved:
kill -9 between the two renames of the checkpoint replace, damaged checkpoint files, a damaged tokenizer
attachment, a finished run resumed twice, DataLoader workers after the trainer is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.util import UserError
from student.checkpoint import MANIFEST, folder_problem, recover_folders
from student.train import CHECKPOINT, FINAL, METRICS, TRAINER_STATE, TrainConfig, train_student

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, dropout=0.1, steps=6,
            batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0, save_every=2, log_every=1,
            num_workers=0, progress=False, chunk_size=64, val_fraction=0.2)

# Runs train_student in a child process; os.replace is wrapped so that the process kills itself (SIGKILL)
# right after the first rename of the KILL_AT-th checkpoint replace (old checkpoint moved aside, new one not
# yet in place). With hang_at_step it instead prints the DataLoader worker pids at that step and waits.
CHILD = r"""
import json, multiprocessing, os, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from student.train import TrainConfig, TrainHooks, train_student
args = json.loads(sys.argv[1])
out = Path(args["cfg"]["out"])
real_replace, seen = os.replace, [0]
def replace(src, dst, *a, **kw):
    real_replace(src, dst, *a, **kw)
    if Path(src) == out / "checkpoint-last" and ".old-" in Path(dst).name:
        seen[0] += 1
        if seen[0] == args.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
def after_step(step):
    if step == args.get("hang_at_step"):
        print("WORKERS", *[p.pid for p in multiprocessing.active_children()], flush=True)
        time.sleep(600)
train_student(TrainConfig(**args["cfg"]), TrainHooks(after_step=after_step))
"""


def child(cfg: dict, stderr, **args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    payload = json.dumps({"cfg": {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}, **args})
    return subprocess.Popen([sys.executable, "-c", CHILD, payload], env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def params_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / METRICS).read_text().splitlines() if ln.strip()]


def hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_bigram_cache(tmp_path_factory.mktemp("bigram") / "cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """An uninterrupted run of TINY."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_student(TrainConfig(cache=cache, out=out, **TINY))
    return out


def test_kill_between_the_checkpoint_renames_then_resume_equals_an_uninterrupted_run(tmp_path, cache,
                                                                                      reference):
    out = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as err:
        # killed while the step-4 checkpoint replaces step 2's
        proc = child(dict(cache=cache, out=out, **TINY), err, kill_at=1)
        proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()[-2000:]
    assert not (out / CHECKPOINT).exists()  # the window: neither name holds a checkpoint
    left = hidden(out)
    assert [n.rsplit("-", 1)[0] for n in left] == [".checkpoint-last.old", ".checkpoint-last.tmp"]
    steps = {n: json.loads((out / n / MANIFEST).read_text())["step"] for n in left}
    assert sorted(steps.values()) == [2, 4]

    result = train_student(TrainConfig(cache=cache, out=out, resume=True, **TINY))
    assert result.final_metrics["step"] == 6
    assert hidden(out) == []  # leftovers removed
    ref, got = params_of(reference / FINAL), params_of(out / FINAL)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [(m["event"], m["step"]) for m in metric_lines(out)] == \
        [(m["event"], m["step"]) for m in metric_lines(reference)]
    assert metric_lines(out)[-1]["val_ce"] == metric_lines(reference)[-1]["val_ce"]


def test_recovery_takes_the_newest_complete_copy_and_removes_leftovers(tmp_path, reference):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(reference / CHECKPOINT, out / ".checkpoint-last.old-11")  # step 6, complete
    newer = out / ".checkpoint-last.tmp-12"  # a later step whose write stopped before its manifest was done
    shutil.copytree(reference / CHECKPOINT, newer)
    m = json.loads((newer / MANIFEST).read_text())
    (newer / MANIFEST).write_text(json.dumps({**m, "step": 8}))
    (newer / TRAINER_STATE).write_bytes((newer / TRAINER_STATE).read_bytes()[:100])
    shutil.copytree(reference / FINAL, out / ".final.tmp-13")
    (out / FINAL).mkdir()  # final/ exists: its hidden copy is only removed
    notes = recover_folders(out)
    assert len(notes) == 1 and ".checkpoint-last.old-11" in notes[0] and "step 6" in notes[0]
    assert folder_problem(out / CHECKPOINT) is None and hidden(out) == []
    assert recover_folders(out) == []


def damage(kind: str, ckpt: Path) -> str:
    """Damage one file of a checkpoint the way a disk or a careless copy would; returns the file's name."""
    def flip(name: str, where: float) -> str:
        data = bytearray((ckpt / name).read_bytes())
        data[int(len(data) * where)] ^= 0x10
        (ckpt / name).write_bytes(bytes(data))
        return name

    if kind == "weights bit":
        return flip("model.safetensors", 0.9)  # inside the tensor data, past the header
    if kind == "optimizer bit":
        return flip(TRAINER_STATE, 0.5)
    if kind == "trainer state bit":
        return flip(TRAINER_STATE, 0.98)
    if kind == "truncated weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    if kind == "config of another size":
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}, indent=2))
        return "config.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["weights bit", "optimizer bit", "trainer state bit", "truncated weights",
                                  "config of another size"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, reference, cache, kind):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    name = damage(kind, out / CHECKPOINT)
    with pytest.raises(UserError) as e:
        train_student(TrainConfig(cache=cache, out=out, resume=True, **TINY))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--resume: {out / CHECKPOINT}: {name} ")
    assert "start a new --out" in msg


def test_damaged_checkpoint_on_the_command_line_is_one_line_and_exit_2(tmp_path, cache, reference,
                                                                       monkeypatch, capsys):
    from pipeline.cli import main

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damage("weights bit", out / CHECKPOINT)
    args = ["--cache", str(cache), "--out", str(out), "--resume", "--no-progress"]
    for key, value in TINY.items():
        if key != "progress":
            args += [f"--{key.replace('_', '-')}", str(value)]
    monkeypatch.setattr(sys, "argv", ["fnet-distill", "train-student", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume:") and "model.safetensors" in lines[0]


def test_a_finished_run_resumed_twice_keeps_one_final_evaluation(tmp_path, cache, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / METRICS).read_text()
    final_mtime = (out / FINAL / "model.safetensors").stat().st_mtime_ns
    for _ in range(2):
        result = train_student(TrainConfig(cache=cache, out=out, resume=True, **TINY))
        assert result.final_metrics["step"] == 6 and "val_ce" in result.final_metrics
    assert (out / METRICS).read_text() == before
    assert sum(m["event"] == "eval" and m["step"] == 6 for m in metric_lines(out)) == 1
    assert (out / FINAL / "model.safetensors").stat().st_mtime_ns == final_mtime
    shutil.rmtree(out / FINAL)  # a crash between the end checkpoint and final/: final/ is written again
    train_student(TrainConfig(cache=cache, out=out, resume=True, **TINY))
    assert folder_problem(out / FINAL) is None
    ref, got = params_of(reference / FINAL), params_of(out / FINAL)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_damaged_tokenizer_attachment_is_refused_when_the_cache_opens(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {str(i): i for i in range(40)}}}))
    cache = write_bigram_cache(tmp_path / "cache", n=8, attachments={"tokenizer": tok})
    data = bytearray((cache / "tokenizer" / "tokenizer.json").read_bytes())
    data[5] ^= 0x01
    (cache / "tokenizer" / "tokenizer.json").write_bytes(bytes(data))
    cfg = {**TINY, "steps": 1}
    with pytest.raises(UserError, match=r"attachment tokenizer is damaged"):
        train_student(TrainConfig(cache=cache, out=tmp_path / "a", **cfg))
    shutil.rmtree(cache / "tokenizer")
    with pytest.raises(UserError, match=r"attachment tokenizer is damaged"):
        train_student(TrainConfig(cache=cache, out=tmp_path / "b", **cfg))
    assert not (tmp_path / "a" / CHECKPOINT).exists() and not (tmp_path / "b" / CHECKPOINT).exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_dataloader_workers_exit_when_the_trainer_is_killed(tmp_path, cache):
    cfg = dict(cache=cache, out=tmp_path / "run", **{**TINY, "steps": 50, "save_every": 0, "num_workers": 2})
    with open(tmp_path / "stderr", "w") as err:
        proc = child(cfg, err, hang_at_step=2)
        line = proc.stdout.readline()
    workers = [int(x) for x in line.split()[1:]]
    assert line.startswith("WORKERS") and len(workers) == 2, (tmp_path / "stderr").read_text()[-2000:]
    deadline = time.monotonic() + 2.0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)  # the trainer only (the workers hold its stdout: communicate() would wait for them)
    proc.stdout.close()

    def alive(pid: int) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    # Parent-death signal: gone at once (PyTorch's own watchdog alone takes up to 5 s, or never exits a
    # worker blocked on a full queue).
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in workers)
