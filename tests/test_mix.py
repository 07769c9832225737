"""Several caches in one training run (``--cache A --cache B --cache-weights``), and one round of offline
on-policy distillation end to end: a student's answers written by ``eval --answers-out``, scored by the
teacher in stage one, and the student continued on them with ``--init-from``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.util import UserError
from student.train import FINAL, TrainConfig, setup, train_student
from student.train_data import MixedDataset, mixture_counts, open_training_data

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(caches: list[Path], out: Path, **kw) -> TrainConfig:
    base = dict(cache=caches[0], mix_caches=tuple(caches[1:]), out=out, hidden_size=16, layers=1, ffn=32,
                window=4, max_positions=64, dropout=0.0, steps=3, batch_tokens=96, lr=3e-3, min_lr=3e-4,
                warmup=1, eval_every=0, save_every=0, log_every=1, num_workers=0, progress=False,
                chunk_size=64)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mix")
    return write_bigram_cache(d / "a", n=10, seed=1), write_bigram_cache(d / "b", n=30, seed=2)


def test_mixture_counts_and_slot_table():
    assert mixture_counts([10, 30], None) == [10, 30]
    assert mixture_counts([10, 30], (1.0, 3.0)) == [10, 30]
    assert mixture_counts([10, 30], (1.0, 1.0)) == [20, 20]
    assert mixture_counts([10, 30], (3.0, 1.0)) == [30, 10]
    parts = [list(range(100, 110)), list(range(200, 230))]
    ds = MixedDataset(parts, [25, 10], seed=7)
    items = [ds[i] for i in range(len(ds))]
    from_a = [x for x in items if x < 200]
    from_b = [x for x in items if x >= 200]
    assert len(from_a) == 25 and len(from_b) == 10
    # oversampled: every sequence of the first part appears 2 or 3 times; undersampled: 10 distinct of 30
    assert set(Counter(from_a).values()) <= {2, 3} and len(set(from_a)) == 10
    assert len(set(from_b)) == 10
    again = MixedDataset(parts, [25, 10], seed=7)
    assert [again[i] for i in range(len(again))] == items
    assert [MixedDataset(parts, [25, 10], seed=8)[i] for i in range(35)] != items


def test_weights_give_the_stated_proportions_of_what_training_reads(caches, tmp_path):
    a, b = caches
    cfg = tiny([a, b], tmp_path / "run", cache_weights=(1.0, 3.0))
    data = open_training_data(cfg)
    assert data.mix["counts"] == [10, 30] and data.mix["shares"] == [0.25, 0.75]
    cfg = tiny([a, b], tmp_path / "run2", cache_weights=(3.0, 1.0))
    data = open_training_data(cfg)
    ra, rb = open_cache(a), open_cache(b)
    inputs_a = {ra[i].input_ids.tobytes() for i in range(len(ra))}
    inputs_b = {rb[i].input_ids.tobytes() for i in range(len(rb))}
    keys = [data.train[i].input_ids.tobytes() for i in range(len(data.train))]
    seen = Counter("a" if k in inputs_a else "b" if k in inputs_b else "?" for k in keys)
    assert seen == {"a": 30, "b": 10}
    lengths = np.asarray(data.train.lengths)
    assert lengths.tolist() == [len(data.train[i].input_ids) for i in range(len(data.train))]
    # the planned epoch (what the loop reads) holds every slot once
    run = setup(tiny([a, b], tmp_path / "run3", cache_weights=(3.0, 1.0)))
    try:
        planned = sorted(int(i) for step in run.sampler.global_steps(0) for mb in step for i in mb)
        assert planned == list(range(40))
    finally:
        run.close()


def test_training_on_a_mix_runs_and_resume_checks_every_cache(caches, tmp_path):
    a, b = caches
    out = tmp_path / "run"
    res = train_student(tiny([a, b], out, steps=3, save_every=3))
    assert res.final_metrics["step"] == 3
    prov = json.loads((out / FINAL / "provenance.json").read_text())
    assert prov["mix"]["caches"] == [str(a), str(b)] and prov["mix"]["counts"] == [10, 30]
    assert "mixed caches" in (out / FINAL / "README.md").read_text()
    c = write_bigram_cache(tmp_path / "c", n=30, seed=3)
    with pytest.raises(UserError, match="cache fingerprint"):
        train_student(tiny([a, c], out, steps=4, resume=True, extend=True))


def test_caches_that_cannot_be_mixed_are_refused_in_one_line(caches, tmp_path):
    a, _ = caches
    other_k = write_bigram_cache(tmp_path / "k", n=8, k=6)
    with pytest.raises(UserError, match="cannot be mixed.*topk") as e:
        open_training_data(tiny([a, other_k], tmp_path / "o1"))
    assert "\n" not in str(e.value)
    other_tok = write_bigram_cache(tmp_path / "t", n=8, tokenizer_hash="another-tokenizer")
    with pytest.raises(UserError, match="tokenizer hash") as e:
        open_training_data(tiny([a, other_tok], tmp_path / "o2"))
    other_teacher = write_bigram_cache(tmp_path / "te", n=8, teacher_seed=5)
    with pytest.raises(UserError, match="teacher"):
        open_training_data(tiny([a, other_teacher], tmp_path / "o3"))
    with pytest.raises(UserError, match="one weight per --cache"):
        tiny([a, other_k], tmp_path / "o4", cache_weights=(1.0,))
    with pytest.raises(UserError, match="given twice"):
        tiny([a, a], tmp_path / "o5")
    with pytest.raises(UserError, match="positive"):
        tiny([a, other_k], tmp_path / "o6", cache_weights=(1.0, 0.0))


# ------------------------------------------------------------------------------ one on-policy round


def test_offline_on_policy_round_end_to_end(tmp_path):
    """The shipped demo teacher and its tokenizer; a tiny student trained a few steps on the teacher's cache
    answers questions (eval --answers-out), the teacher scores exactly that text, and the student continues on
    it from its own weights."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.demo.problems import iter_problems, write_jsonl

    teacher = Path(__file__).resolve().parents[1] / "pipeline" / "demo" / "pretrained" / "teacher"
    it = iter_problems(9, stream="onpolicy")
    rows = [next(it) for _ in range(24)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    runner = CliRunner()

    def ok(args: list[str]) -> str:
        res = runner.invoke(app, args)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        assert res.exit_code == 0, res.output
        return res.output

    common = ["--teacher", str(teacher), "--topk", "8", "--temperatures", "1", "--max-length", "256",
              "--device", "cpu", "--no-progress"]
    ok(["teacher-cache", "--dataset", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "ref"), *common])
    student = ["--hidden-size", "16", "--layers", "1", "--ffn", "32", "--window", "4", "--max-positions",
               "256", "--batch-tokens", "1024", "--device", "cpu", "--num-workers", "0", "--no-progress",
               "--eval-every", "0", "--save-every", "0", "--temperature", "1"]
    ok(["train-student", "--cache", str(tmp_path / "ref"), "--out", str(tmp_path / "s0"), "--steps", "3",
        *student])
    answers = tmp_path / "answers.jsonl"
    ok(["eval", "--model", str(tmp_path / "s0" / FINAL), "--dataset", str(tmp_path / "train.jsonl"),
        "--split", "x", "--max-new-tokens", "12", "--device", "cpu", "--answers-out", str(answers),
        "--no-progress"])
    written = [json.loads(x) for x in answers.read_text().splitlines()]
    assert written and all(r["written_by"] == str(tmp_path / "s0" / FINAL) for r in written)
    out = ok(["teacher-cache", "--dataset", str(answers), "--out", str(tmp_path / "scored"), *common])
    assert f"scored from file: {len(written)} answers" in out
    reader = open_cache(tmp_path / "scored", verify_hashes="all")
    rows_file = tmp_path / "scored" / "provenance" / "rows.jsonl"
    prov = [json.loads(x) for x in rows_file.read_text().splitlines()]
    assert {p["source"] for p in prov} == {"file"} and all(p["correct"] is False or p["correct"] is True
                                                           for p in prov)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    for p in prov:  # the scored rows are the student's own text after its question's prompt
        rec = reader[p["seq_id"]]
        text = tok.decode(rec.input_ids[rec.assistant_start:], skip_special_tokens=True)
        assert text == written[p["row"]]["answer"]
        assert written[p["row"]]["question"] in tok.decode(rec.input_ids[: rec.assistant_start])
    ok(["train-student", "--init-from", str(tmp_path / "s0" / FINAL), "--cache", str(tmp_path / "ref"),
        "--cache", str(tmp_path / "scored"), "--out", str(tmp_path / "r1"), "--steps", "2", *student])
    prov1 = json.loads((tmp_path / "r1" / FINAL / "provenance.json").read_text())
    assert prov1["mix"]["counts"] == [24, len(written)]
