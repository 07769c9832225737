"""``fnet-distill demo --tiny`` through the real CLI: every stage's folder, the report's files and fields,
and that the numbers in the report are the ones the stages wrote (metrics.jsonl, cache manifests, eval
records)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache.util import UserError
from pipeline.cli import app

STAGES = ("assets", "teacher-cache train", "teacher-cache test", "train-student KD", "train-student CE",
          "teacher val CE", "eval teacher", "eval kd", "eval ce", "total")
FAIRNESS_FREE = {"out", "alpha"}


def _demo(out: Path, *extra: str):
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--tiny", "--no-progress", *extra])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, _demo(out).output


def _last_eval(student_dir: Path) -> dict:
    rows = [json.loads(ln) for ln in (student_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in rows if r.get("event") == "eval"][-1]


def test_report_files_and_fields(tiny_demo):
    out, stdout = tiny_demo
    for name in ("assets", "cache-train", "cache-test", "student-kd/final", "student-ce/final"):
        assert (out / name).is_dir(), name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert md in stdout
    for row in ("| teacher |", "| KD student |", "| CE-only student |", "| cache-train |", "| cache-test |"):
        assert row in md
    report = json.loads((out / "report.json").read_text())
    assert report["markdown"] == md
    assert set(report["wall_s"]) == set(STAGES)
    assert all(v >= 0 for v in report["wall_s"].values())
    assert report["wall_s"]["total"] >= sum(v for k, v in report["wall_s"].items() if k != "total") - 1e-6
    for key in ("cpu_model", "usable_cores", "torch", "torch_threads"):
        assert key in report["machine"]
    for name in ("teacher", "kd", "ce"):
        row = report["models"][name]
        for key in ("val_ce", "val_kl", "val_top1_agree", "exact"):
            assert key in row, (name, key)
        assert math.isfinite(row["val_ce"]) and row["val_ce"] > 0
    v = report["kd_vs_ce"]
    assert v["val_ce"] == (report["models"]["kd"]["val_ce"] < report["models"]["ce"]["val_ce"])
    assert v["val_kl"] == (report["models"]["kd"]["val_kl"] < report["models"]["ce"]["val_kl"])
    assert ("**yes**" if v["val_ce"] else "**no**") in md


def test_report_numbers_come_from_the_stages(tiny_demo):
    out, _ = tiny_demo
    report = json.loads((out / "report.json").read_text())
    models = report["models"]
    for name in ("kd", "ce"):
        last = _last_eval(out / f"student-{name}")
        for key in ("val_ce", "val_kl", "val_top1_agree"):
            assert models[name][key] == pytest.approx(last[key], rel=1e-12), (name, key)
    # The teacher's label CE is measured on exactly the supervised tokens the students are validated on.
    assert models["teacher"]["val_tokens"] == models["kd"]["val_tokens"] == models["ce"]["val_tokens"]
    assert models["teacher"]["val_ce"] < models["ce"]["val_ce"]
    for split in ("train", "test"):
        manifest = json.loads((out / f"cache-{split}" / "manifest.json").read_text())
        c = report["caches"][split]
        assert c["bytes_per_token"] == pytest.approx(manifest["stats"]["bytes_per_token"])
        assert c["tokens"] == manifest["num_tokens"] and c["sequences"] == manifest["num_sequences"]
    for name in ("teacher", "kd", "ce"):
        records = [json.loads(ln) for ln in (out / f"eval-{name}.jsonl").read_text().splitlines()]
        exact = models[name]["exact"]
        assert exact["n"] == len(records) == report["config"]["resolved"]["eval_limit"]
        assert exact["strict_correct"] == sum(r["strict_correct"] for r in records)
        assert exact["flexible_correct"] == sum(r["flexible_correct"] for r in records)


def test_kd_and_ce_runs_differ_only_in_alpha(tiny_demo):
    out, _ = tiny_demo
    kd = json.loads((out / "student-kd" / "final" / "train_config.json").read_text())
    ce = json.loads((out / "student-ce" / "final" / "train_config.json").read_text())
    assert ce["config"]["alpha"] == 1.0 and kd["config"]["alpha"] < 1.0
    diff = {k for k in kd["config"] if kd["config"][k] != ce["config"][k]}
    assert diff == FAIRNESS_FREE
    assert kd["student"] == ce["student"]


def test_rerun_reuses_assets_and_caches_and_retrains(tiny_demo):
    out, _ = tiny_demo
    before = (out / "student-kd" / "metrics.jsonl").stat().st_mtime_ns
    _demo(out, "--steps", "3", "--eval-limit", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["assets"]["reused"] is True
    for split in ("train", "test"):
        c = report["caches"][split]
        assert c["units_skipped"] == c["units_total"] >= 1
    assert (out / "student-kd" / "metrics.jsonl").stat().st_mtime_ns != before
    assert _last_eval(out / "student-kd")["step"] == 3
    assert report["models"]["kd"]["exact"] is None and "not run" in report["markdown"]


def test_gsm8k_without_shared_files_is_one_clear_error(tmp_path):
    (tmp_path / "shared").mkdir()
    with pytest.raises(UserError, match="--shared"):
        _demo(tmp_path / "run", "--gsm8k", "--shared", str(tmp_path / "shared"))


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(UserError, match="--scale"):
        _demo(tmp_path / "a", "--scale", "0")
    with pytest.raises(UserError, match="--alpha"):
        _demo(tmp_path / "b", "--alpha", "1")


@pytest.mark.slow
def test_gsm8k_smoke(tmp_path, qwen_tokenizer_dir, gsm8k_dir):
    out = tmp_path / "run"
    _demo(out, "--gsm8k", "--shared", str(gsm8k_dir.parents[1]), "--steps", "3", "--eval-limit", "2")
    report = json.loads((out / "report.json").read_text())
    assert report["variant"] == "gsm8k smoke test"
    assert report["assets"]["tokenizer_vocab"] >= 151_000
    assert report["models"]["teacher"]["val_tokens"] == report["models"]["kd"]["val_tokens"] > 0
    assert (out / "curves.png").is_file() and (out / "eval-kd.jsonl").is_file()
