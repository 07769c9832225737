"""Run management of train-student: --init-from, --resume --extend, --keep-best, --report-to tensorboard,
and progress lines in a log file."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.util import UserError
from student.checkpoint import BEST, MANIFEST, PROVENANCE, folder_problem
from student.schedule import lr_at
from student.train import CHECKPOINT, FINAL, METRICS, TrainConfig, setup, train_student
from student.train_config import SHAPE_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, dropout=0.1, steps=4,
            batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=2, save_every=0, log_every=1,
            num_workers=0, progress=False, chunk_size=64, val_fraction=0.2)


def params_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / METRICS).read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_bigram_cache(tmp_path_factory.mktemp("bigram") / "cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    train_student(TrainConfig(cache=cache, out=out, **TINY))
    return out


def test_init_from_starts_at_the_trained_weights_and_checks_the_folder(tmp_path, cache, trained):
    run = setup(TrainConfig(cache=cache, out=tmp_path / "a", init_from=trained / FINAL,
                            **{**TINY, "hidden_size": 64}))  # the folder's shape wins over --hidden-size
    want = params_of(trained / FINAL)
    got = {k: v.detach() for k, v in run.model.state_dict().items()}
    assert want.keys() <= got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert run.model.config.hidden_size == 16
    wide = {**TINY, "hidden_size": 64}  # an option the folder's shape replaces
    result = train_student(TrainConfig(cache=cache, out=tmp_path / "b", init_from=trained / FINAL, **wide))
    assert result.final_metrics["val_ce"] < metric_lines(trained)[0]["val_ce"]  # below a random init's
    # the record shows the model's shape, never the unused --hidden-size .. --dropout options
    record = json.loads((tmp_path / "b" / FINAL / "train_config.json").read_text())
    assert all(record["config"][k] is None for k in SHAPE_FIELDS)
    assert record["student"]["hidden_size"] == 16
    # ... and the same command resumes it (the null options are not a difference)
    resumed = train_student(TrainConfig(cache=cache, out=tmp_path / "b", init_from=trained / FINAL,
                                        resume=True, extend=True, **{**wide, "steps": TINY["steps"] + 1}))
    assert resumed.final_metrics["step"] == TINY["steps"] + 1

    with pytest.raises(UserError, match="is not a model folder"):
        TrainConfig(cache=cache, out=tmp_path / "c", init_from=tmp_path, **TINY)
    with pytest.raises(UserError, match="trained FNet student keeps its folder's vocabulary; drop --compact"):
        TrainConfig(cache=cache, out=tmp_path / "c", init_from=trained / FINAL, compact_vocab=True, **TINY)
    damaged = tmp_path / "damaged"
    shutil.copytree(trained / FINAL, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"^--init-from: .*: model\.safetensors does not match its content"):
        setup(TrainConfig(cache=cache, out=tmp_path / "d", init_from=damaged, **TINY))
    short_cache = write_bigram_cache(tmp_path / "short", n=8, lengths=(8, 10))
    short = tmp_path / "short-run"
    train_student(TrainConfig(cache=short_cache, out=short, **{**TINY, "max_positions": 12, "steps": 1}))
    with pytest.raises(UserError, match="max_position_embeddings=12 but the cache holds sequences of"):
        setup(TrainConfig(cache=cache, out=tmp_path / "e", init_from=short / FINAL, **TINY))


def test_extend_keeps_the_schedule_and_equals_a_run_planned_that_way(tmp_path, cache, trained):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    with pytest.raises(UserError, match="use it with --resume"):
        TrainConfig(cache=cache, out=out, extend=True, **{**TINY, "steps": 7})
    with pytest.raises(UserError, match=r"steps: 4 in the checkpoint, 7 now"):
        train_student(TrainConfig(cache=cache, out=out, resume=True, **{**TINY, "steps": 7}))
    with pytest.raises(UserError, match="--steps 3 is below the checkpoint's 4"):
        train_student(TrainConfig(cache=cache, out=out, resume=True, extend=True, **{**TINY, "steps": 3}))
    extended = TrainConfig(cache=cache, out=out, resume=True, extend=True, **{**TINY, "steps": 7})
    result = train_student(extended)
    assert result.final_metrics["step"] == 7

    lines = metric_lines(out)
    lrs = {m["step"]: m["lr"] for m in lines if m["event"] == "train"}
    assert [lrs[s] for s in (1, 2, 3, 4)] == [m["lr"] for m in metric_lines(trained) if m["event"] == "train"]
    assert [lrs[s] for s in (5, 6, 7)] == [TINY["min_lr"]] * 3
    assert sum(m["event"] == "eval" and m["step"] == 4 for m in lines) == 1
    # the same as a run that planned 7 steps with the 4-step schedule from the start
    planned = tmp_path / "planned"
    train_student(TrainConfig(cache=cache, out=planned, schedule_steps=4, **{**TINY, "steps": 7}))
    a, b = params_of(out / FINAL), params_of(planned / FINAL)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(m["event"], m["step"], m.get("lr")) for m in lines] == \
        [(m["event"], m["step"], m.get("lr")) for m in metric_lines(planned)]
    with pytest.raises(UserError, match="was extended to 7 steps with --extend"):
        train_student(TrainConfig(cache=cache, out=out, resume=True, **{**TINY, "steps": 7}))
    assert train_student(extended).final_metrics["step"] == 7


def test_lr_after_the_schedule_is_min_lr():
    cfg = TrainConfig(cache=Path("c"), out=Path("o"), schedule_steps=4, **{**TINY, "steps": 9})
    cfg = cfg.schedule_config()
    assert cfg.total_steps == 4 and lr_at(3, cfg) > lr_at(4, cfg) == lr_at(8, cfg) == TINY["min_lr"]


def test_keep_best_keeps_the_lowest_validation_ce(tmp_path, cache):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--keep-best .* give --val-cache or --val-fraction"):
        TrainConfig(cache=cache, out=out, keep_best=True, **{**TINY, "val_fraction": 0.0})
    train_student(TrainConfig(cache=cache, out=out, keep_best=True, **{**TINY, "steps": 8, "lr": 3e-2}))
    evals = [m for m in metric_lines(out) if m["event"] == "eval"]
    best = min(evals, key=lambda m: m["val_ce"])
    assert folder_problem(out / BEST) is None
    assert json.loads((out / BEST / MANIFEST).read_text())["step"] == best["step"]
    assert json.loads((out / BEST / PROVENANCE).read_text())["step"] == best["step"]
    if best["step"] == 8:
        a, b = params_of(out / BEST), params_of(out / FINAL)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "plain" / BEST).exists()


def test_report_to_tensorboard_writes_the_metrics_jsonl_numbers(tmp_path, cache):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train_student(TrainConfig(cache=cache, out=out, report_to="tensorboard", **TINY))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    expected = 0
    for m in metric_lines(out):
        for key, value in m.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isclose(scalars[f"{m['event']}/{key}"][m["step"]], value, rel_tol=1e-6,
                                    abs_tol=1e-30), (m["event"], key)
                expected += 1
    assert sum(len(v) for v in scalars.values()) == expected > 20


def test_report_to_tensorboard_without_the_package_is_one_clear_line(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"--report-to tensorboard needs the tensorboard package: pip"):
        train_student(TrainConfig(cache=cache, out=tmp_path / "run", report_to="tensorboard", **TINY))
    with pytest.raises(UserError, match=r"--report-to must be one of none\|tensorboard\|wandb"):
        TrainConfig(cache=cache, out=tmp_path / "run", report_to="comet", **TINY)


def test_progress_in_a_log_file_is_plain_lines(tmp_path, cache, capsys):
    train_student(TrainConfig(cache=cache, out=tmp_path / "run", **{**TINY, "progress": True}))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("train-student: ") and "parameters" in lines[0]
    progress = [ln for ln in lines if ln.startswith("train ")]
    assert [ln.split()[1] for ln in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("loss" in ln and "tok/s" in ln for ln in progress) and "ETA" in progress[0]
    train_student(TrainConfig(cache=cache, out=tmp_path / "quiet", **TINY))  # --no-progress: summary only
    assert [ln.split(":")[0] for ln in capsys.readouterr().err.splitlines()] == ["train-student"]
    assert not (tmp_path / "run" / CHECKPOINT / BEST).exists()
