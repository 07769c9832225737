"""The `fnet-distill` entry point: every command is registered, and errors are one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FNET = str(Path(sys.executable).with_name("fnet-distill"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FNET, *args], capture_output=True, text=True, timeout=120)


def test_every_command_is_registered_with_help():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("teacher-cache", "cache", "train-student", "eval", "generate", "demo"):
        assert command in out.stdout
    for args in (["cache", "info"], ["cache", "verify"]):
        assert run_cli(*args, "--help").returncode == 0


def test_disk_error_is_one_line_and_exit_2(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = run_cli("demo", "--tiny", "--out", str(blocker / "demo"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Not a directory" in lines[0]
    assert "rerun the same command" in lines[0]
