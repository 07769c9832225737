"""train-student --report-to: the tracker choices, and a Weights & Biases run (offline mode, read back from
its own .wandb file) that holds exactly the metrics.jsonl numbers and the resolved run config."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.util import UserError
from student.reporting import REPORT_TO, WANDB_RUN_ID, parse_report_to
from student.train import METRICS, TrainConfig, train_student

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, dropout=0.1, steps=4,
            batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=2, save_every=2, log_every=1,
            num_workers=0, progress=False, chunk_size=64, val_fraction=0.2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_bigram_cache(tmp_path_factory.mktemp("bigram") / "cache")


def test_report_to_takes_none_one_tracker_or_both(tmp_path):
    assert REPORT_TO == ("none", "tensorboard", "wandb")
    assert parse_report_to("none") == ()
    assert parse_report_to("wandb") == ("wandb",)
    assert parse_report_to("wandb, tensorboard") == ("tensorboard", "wandb")
    cfg = TrainConfig(cache=Path("c"), out=tmp_path / "o", report_to="wandb,tensorboard")
    assert cfg.report_to == "tensorboard,wandb"  # one spelling in train_config.json
    assert TrainConfig(cache=Path("c"), out=tmp_path / "o").report_to == "none"
    for bad in ("comet", "none,wandb", "", "tensorboard,mlflow"):
        with pytest.raises(UserError, match=r"--report-to must be one of none\|tensorboard\|wandb"):
            TrainConfig(cache=Path("c"), out=tmp_path / "o", report_to=bad)


def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-log
    records (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32 * 1024, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def read_offline_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    """(run info, history rows, config) of one offline run folder."""
    (path,) = run_dir.glob("run-*.wandb")
    info, rows, config = {}, [], {}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info = {"id": r.run.run_id, "project": r.run.project, "name": r.run.display_name}
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "history":
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    return info, rows, config


def test_wandb_offline_run_holds_the_metrics_jsonl_numbers_and_the_run_config(tmp_path, cache, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))  # the run folder must win over this
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    out = tmp_path / "run"
    cfg = TrainConfig(cache=cache, out=out, report_to="wandb,tensorboard", wandb_project="kd-tests",
                      run_name="tiny", **TINY)
    train_student(cfg)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (out / "tensorboard").is_dir() and not (tmp_path / "wandb-dir").exists()
    info, rows, config = read_offline_run(runs[0])
    assert info == {"id": (out / "wandb" / WANDB_RUN_ID).read_text(), "project": "kd-tests", "name": "tiny"}
    config.pop("_wandb", None)
    assert config == cfg.to_json()  # the resolved run config (warmup filled in, report_to normalised)

    records = [json.loads(ln) for ln in (out / METRICS).read_text().splitlines() if ln.strip()]
    assert len(rows) == len(records) and {r["event"] for r in records} == {"train", "eval"}
    compared = 0
    for record, row in zip(records, rows):  # one W&B history row per metrics.jsonl line, in order
        assert row.pop("step") == record["step"]
        row = {k: v for k, v in row.items() if not k.startswith("_")}  # W&B's own _step, _runtime, ...
        expected = {f"{record['event']}/{k}": v for k, v in record.items()
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            assert math.isclose(row[key], value, rel_tol=1e-12, abs_tol=0.0), key
            compared += 1
    assert compared > 40

    # --resume continues the same W&B run (a second offline folder with the same id)
    train_student(TrainConfig(cache=cache, out=out, report_to="wandb", resume=True, extend=True,
                              **{**TINY, "steps": 6}))
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and read_offline_run(runs[1])[0]["id"] == info["id"]
    steps = [row["step"] for row in read_offline_run(runs[1])[1]]
    assert steps and min(steps) == 5 and max(steps) == 6


def test_report_to_wandb_without_the_package_is_one_clear_line(tmp_path, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^--report-to wandb needs the wandb package: pip install wandb "
                                        r"\(or pip install 'fnet-distill\[wandb\]'\), or drop --report-to$"):
        train_student(TrainConfig(cache=cache, out=tmp_path / "run", report_to="wandb", **TINY))
