"""What train-student writes when its inputs or outputs are not the usual: a read-only cache (``chmod -R
a-w``, the normal state of a shared dataset) trained on without the power to override permissions (root
drops CAP_DAC_OVERRIDE with setpriv, as a plain user would be); a ``--report-to tensorboard`` folder that
cannot be written fails in one line without a writer-thread traceback."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest
from tiny_student import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--hidden-size", "16", "--layers", "1", "--ffn", "32", "--window", "4", "--max-positions", "64",
        "--steps", "2", "--batch-tokens", "96", "--warmup", "1", "--eval-every", "0", "--save-every", "1",
        "--num-workers", "0", "--no-progress", "--device", "cpu"]


def as_plain_user() -> list[str]:
    """A command prefix under which permissions apply: nothing for a non-root user; for root, setpriv
    without the capabilities that bypass file modes (skips the test when setpriv is missing)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes cannot be enforced")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def train(argv: list[str], prefix: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*prefix, sys.executable, "-m", "pipeline", "train-student", *argv, *ARGS],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def chmod_tree(root: Path, remove: int) -> None:
    for p in [root, *root.rglob("*")]:
        os.chmod(p, stat.S_IMODE(p.stat().st_mode) & ~remove)


def test_training_from_a_read_only_cache_writes_checkpoints_with_the_outputs_modes(tmp_path):
    tok = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok)
    cache = write_bigram_cache(tmp_path / "cache", n=8, attachments={"tokenizer": tok})
    chmod_tree(cache, 0o222)  # chmod -R a-w
    out = tmp_path / "run"
    proc = train(["--cache", str(cache), "--out", str(out)], as_plain_user())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("checkpoint-last", "final"):
        folder = out / name
        assert (folder / "tokenizer.json").is_file()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {0o644}, modes  # under the test's umask 022, not the cache's 0444
    assert stat.S_IMODE((cache / "tokenizer" / "tokenizer.json").stat().st_mode) == 0o444  # untouched
    chmod_tree(cache, 0)


@pytest.fixture
def umask022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_an_unwritable_tensorboard_folder_fails_in_one_line(tmp_path, umask022):
    pytest.importorskip("tensorboard")
    cache = write_bigram_cache(tmp_path / "cache", n=8)
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.old").write_bytes(b"")  # a fresh run cannot clear it either
    os.chmod(out / "tensorboard", 0o555)
    try:
        proc = train(["--cache", str(cache), "--out", str(out), "--report-to", "tensorboard"],
                     as_plain_user())
    finally:
        os.chmod(out / "tensorboard", 0o755)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: --report-to tensorboard cannot write"), proc.stderr
