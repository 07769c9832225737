"""A Hugging Face Hub id without a network fails within seconds, with one line naming the flag that takes a
local copy instead (no retries, no warnings). The network is blocked by the environment: an empty HF cache
and ``HF_HUB_OFFLINE=1``, or ``HF_ENDPOINT`` pointing at a closed local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cache.util import UserError
from pipeline import hub

HUB_ID = "Qwen/Qwen2-0.5B-Instruct"


def run(args: list[str], tmp_path, **env_extra) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m pipeline ARGS`` with an empty Hugging Face cache; (result, wall seconds)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), OMP_NUM_THREADS="1", **env_extra)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                         timeout=300, cwd=tmp_path)
    return res, time.perf_counter() - t0


def one_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.fixture
def closed_endpoint(monkeypatch):
    """In this process: the Hub endpoint is a closed local port and HF_HUB_OFFLINE is not set."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.hub_unreachable_reason.cache_clear()
    yield
    hub.hub_unreachable_reason.cache_clear()


def test_the_probe_answers_within_seconds_and_names_the_flag(closed_endpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    with pytest.raises(UserError) as info:
        hub.hub_local_only(HUB_ID, flag="--teacher", what="teacher")
    assert time.perf_counter() - t0 < 10  # a refused connection: no retries, no 30-60 s of backoff
    msg = str(info.value)
    assert "--teacher path/to/folder" in msg and "127.0.0.1:9" in msg and HUB_ID in msg
    with pytest.raises(UserError, match="--dataset path/to/test.jsonl"):
        hub.hub_local_only("openai/gsm8k", flag="--dataset", what="dataset", filename="README.md",
                           repo_type="dataset")


def run_in_process(monkeypatch, capsys, args: list[str]) -> str:
    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def black_hole():
    """A local 'Hub' that accepts connections and closes them unanswered; counts the connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    seen = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            seen[0] += 1
            conn.close()

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    stop.set()
    worker.join(2)
    server.close()


def test_commands_name_the_flag_in_a_real_process(tmp_path, black_hole):
    """The whole command in a real process, the Hub unreachable by environment: one line naming the flag,
    after exactly one request (the probe; transformers would retry for ~55 s)."""
    endpoint, seen = black_hole
    res, _ = run(["teacher-cache", "--teacher", HUB_ID, "--out", str(tmp_path / "c")], tmp_path,
                 HF_ENDPOINT=endpoint)
    line = one_line(res)
    assert "--teacher path/to/folder" in line and "--tokenizer" not in line
    assert not (tmp_path / "c").exists()
    assert seen[0] == 1

    res, _ = run(["eval", "--model", HUB_ID, "--dataset", "x.jsonl"], tmp_path, HF_HUB_OFFLINE="1",
                 HF_ENDPOINT=endpoint)
    assert "--model path/to/folder" in one_line(res) and "HF_HUB_OFFLINE" in res.stderr
    assert seen[0] == 1  # offline by environment: not even the probe


def test_teacher_cache_names_tokenizer_or_dataset(closed_endpoint, tmp_path, tiny_qwen_dir,
                                                  qwen_tokenizer_dir, gsm8k_slice, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    line = run_in_process(monkeypatch, capsys, [
        "teacher-cache", "--teacher", str(tiny_qwen_dir), "--tokenizer", HUB_ID,
        "--dataset", str(gsm8k_slice), "--out", str(tmp_path / "c")])
    assert "--tokenizer path/to/folder" in line
    line = run_in_process(monkeypatch, capsys, [
        "teacher-cache", "--teacher", str(tiny_qwen_dir), "--tokenizer", str(qwen_tokenizer_dir),
        "--out", str(tmp_path / "c")])
    assert "'openai/gsm8k'" in line and "--dataset path/to/test.jsonl" in line
    line = run_in_process(monkeypatch, capsys, ["eval", "--model", str(tiny_qwen_dir), "--tokenizer", HUB_ID,
                                                "--dataset", str(gsm8k_slice)])
    assert "--tokenizer path/to/folder" in line
