"""What the project publishes honours the umask as a plain ``open``/``mkdir`` would: 0644 files and 0755
folders under umask 022 (not the 0600/0700 of ``mkstemp``/``mkdtemp``), for a cache, a checkpoint and
``final/``."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.schema import CacheSettings
from cache.util import apply_umask_tree, atomic_write_json, make_temp_dir
from cache.writer import CacheWriter


@pytest.fixture
def umask():
    """Set a umask for the test and restore the previous one after."""
    before = os.umask(0o022)
    os.umask(before)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(before)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of every file and folder under it, by relative path."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def assert_shared(root: Path, fmode: int = 0o644, dmode: int = 0o755) -> None:
    wrong = {k: oct(m) for k, m in modes(root).items()
             if m != (dmode if (root / k).is_dir() else fmode)}
    assert not wrong, f"modes other than {oct(fmode)}/{oct(dmode)} under {root}: {wrong}"


@pytest.mark.parametrize("mask,fmode,dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_cache_files_and_attachments_follow_the_umask(tmp_path, umask, mask, fmode, dmode):
    umask(mask)
    write_bigram_cache(tmp_path / "cache", n=4)
    assert_shared(tmp_path / "cache", fmode, dmode)

    # an attachment made in a private temporary folder (as teacher-cache saves the tokenizer) is published
    # with the umask's modes, not the 0700/0600 of TemporaryDirectory/mkstemp
    settings = CacheSettings(topk=2, vocab_size=8, temperatures=(1.0,), dtype="float32")
    with tempfile.TemporaryDirectory() as src:
        fd, _ = tempfile.mkstemp(dir=src, suffix=".json")
        os.write(fd, b"{}")
        os.close(fd)
        with CacheWriter(tmp_path / "c2", fingerprint={"t": 1}, settings=settings) as w:
            w.finalize(0, attachments={"tokenizer": src},
                       tokenizer={"vocab_size": 8, "eos_token_id": 0, "pad_token_id": 0, "hash": "h"})
    assert_shared(tmp_path / "c2", fmode, dmode)


def test_helpers_publish_with_the_umask(tmp_path, umask):
    umask(0o022)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    d = make_temp_dir(".x-", tmp_path)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    script = d / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chmod(script, 0o700)
    apply_umask_tree(d)  # execute bits survive, widened as far as the umask allows
    assert stat.S_IMODE(script.stat().st_mode) == 0o755


def test_checkpoint_and_final_follow_the_umask(tmp_path, umask, monkeypatch, capsys):
    from pipeline.cli import main

    cache = write_bigram_cache(tmp_path / "cache", n=8)
    out = tmp_path / "run"
    umask(0o022)
    monkeypatch.setattr(sys, "argv", [
        "fnet-distill", "train-student", "--cache", str(cache), "--out", str(out), "--hidden-size", "16",
        "--layers", "1", "--ffn", "32", "--window", "4", "--max-positions", "64", "--steps", "2",
        "--batch-tokens", "96", "--warmup", "1", "--eval-every", "0", "--save-every", "1",
        "--num-workers", "0", "--no-progress"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 0, capsys.readouterr().err
    for name in ("checkpoint-last", "final"):
        assert (out / name / "model.safetensors").exists()
        assert_shared(out / name)
    assert stat.S_IMODE((out / "metrics.jsonl").stat().st_mode) == 0o644
