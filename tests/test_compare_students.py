"""bench/compare_students.py reuses a finished student only when what it depends on is unchanged: a cut is
redone from another teacher, and a quality run's key changes with the caches, the budget and the cut (an
earlier version reprinted results of an earlier teacher as if they were current)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "pipeline" / "demo" / "pretrained" / "teacher"
sys.path.insert(0, str(REPO / "bench"))
import compare_students as cs  # noqa: E402


@pytest.fixture()
def teacher(tmp_path) -> Path:
    if not (TEACHER / "config.json").exists():
        pytest.skip("the shipped demo teacher is missing")
    return Path(shutil.copytree(TEACHER, tmp_path / "teacher"))


def test_a_cut_is_reused_for_its_teacher_and_redone_for_another(tmp_path, teacher):
    out = tmp_path / "cut-init"
    first = cs.make_cut(teacher, out, None)
    weights = (out / "model.safetensors").read_bytes()
    source = json.loads((out / "source.json").read_text())
    stamp = (out / "cut.json").stat().st_mtime_ns
    assert cs.make_cut(teacher, out, None) == first and (out / "cut.json").stat().st_mtime_ns == stamp
    # another teacher in the same folder: its embeddings changed, so must the cut
    from safetensors.torch import load_file, save_file

    w = load_file(teacher / "model.safetensors")
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] + 1.0
    save_file(w, teacher / "model.safetensors", metadata={"format": "pt"})
    cs.make_cut(teacher, out, None)
    assert (out / "model.safetensors").read_bytes() != weights
    assert json.loads((out / "source.json").read_text())["teacher_weights"] != source["teacher_weights"]


def test_the_run_key_follows_caches_budget_and_cut_but_not_paths(tmp_path):
    from student.train_config import TrainConfig

    demo = SimpleNamespace(out=tmp_path)
    for name, digest in (("cache-train", "a"), ("cache-test", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"fingerprint_digest": digest}))
    tc = TrainConfig(cache=tmp_path / "cache-train", out=tmp_path / "s0", steps=100)
    key = cs.run_key(tc, demo, None)
    moved = TrainConfig(cache=tmp_path / "cache-train", out=tmp_path / "elsewhere", steps=100)
    assert cs.run_key(moved, demo, None) == key  # where it is written does not change what it is
    longer = TrainConfig(cache=tmp_path / "cache-train", out=tmp_path / "s0", steps=200)
    assert cs.run_key(longer, demo, None) != key
    (tmp_path / "cache-train" / "manifest.json").write_text(json.dumps({"fingerprint_digest": "new teacher"}))
    assert cs.run_key(tc, demo, None) != key
    cut = tmp_path / "cut-init"
    cut.mkdir()
    (cut / "source.json").write_text(json.dumps({"teacher_weights": "x"}))
    with_cut = cs.run_key(tc, demo, cut)
    (cut / "source.json").write_text(json.dumps({"teacher_weights": "y"}))
    assert cs.run_key(tc, demo, cut) != with_cut
