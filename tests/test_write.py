"""Stage one as a writer (``teacher-cache --write``): the sampler against an independent full-forward
reference, reproducibility across batching, keeping (reference, majority with ties, duplicates), provenance,
resume and refusal, and cached rows equal to scoring the same text as a reference answer.

The writer is the demo's shipped Qwen2 teacher (0.85 M parameters, trained on the demo's word problems, so it
stops at eos and answers most questions): a real model that needs nothing from ../shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_9_when  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.util import UserError
from pipeline.demo.problems import iter_problems, write_jsonl
from pipeline.teacher_cache import PROVENANCE_ROWS, TeacherCacheConfig, run_teacher_cache
from pipeline.write import WriteSettings, Written, choose, pick_tokens, row_uniforms, sample_solutions

TEACHER = Path(__file__).resolve().parents[1] / "pipeline" / "demo" / "pretrained" / "teacher"


@pytest.fixture(scope="module")
def writer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (TEACHER / "config.json").exists():
        pytest.skip("the shipped demo teacher is missing")
    tok = AutoTokenizer.from_pretrained(TEACHER)
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    return model, tok


def problems(n: int, seed: int = 11) -> list[dict]:
    it = iter_problems(seed, stream="tests")
    return [next(it) for _ in range(n)]


def prompt(tok, question: str) -> list[int]:
    from pipeline.prompts import prompt_ids

    return prompt_ids(tok, question, "x")


# ------------------------------------------------------------------------------------------ the sampler


def reference_pick(logits: np.ndarray, u: float, temperature: float, top_p: float) -> int:
    """Nucleus sampling by the book, in numpy: sort, cut where the mass before an id reaches top_p,
    renormalise, inverse CDF at u."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    ps = p[order]
    keep = (np.cumsum(ps) - ps) < top_p
    ps = np.where(keep, ps, 0.0)
    cdf = np.cumsum(ps)
    return int(order[np.searchsorted(cdf, u * cdf[-1], side="right")])


def test_pick_tokens_equals_nucleus_sampling_by_the_book():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.95), (1.3, 0.5), (0.5, 0.01)):
        for _ in range(20):
            u = rng.random(6)
            got = pick_tokens(torch.from_numpy(logits), torch.from_numpy(u), temperature, top_p)
            want = [reference_pick(logits[i], u[i], temperature, top_p) for i in range(6)]
            assert got.tolist() == want, (temperature, top_p)
    greedy = pick_tokens(torch.from_numpy(logits), torch.zeros(6, dtype=torch.float64), 0.0, 1.0)
    assert greedy.tolist() == logits.argmax(1).tolist()


def test_candidate_tiers_equal_the_sorted_vocabulary_row_by_row():
    """Peaked rows are drawn among their first tier of most likely ids, rows with a wider nucleus among the
    second, flat ones sort the whole vocabulary; all draw what the sorted vocabulary gives, and a row draws
    the same alone as in any batch."""
    import pipeline.write as write

    rng = np.random.default_rng(1)
    V = 5000
    wide = rng.normal(size=(4, V)) * 0.5
    wide[:, rng.choice(V, 100, replace=False)] += 12.0  # a nucleus of ~100 ids: past tier 1, inside tier 2
    peaked, flat = rng.normal(size=(4, V)) * 8, rng.normal(size=(4, V)) * 0.5
    logits = np.concatenate([peaked, wide, flat]).astype(np.float32)
    z = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    first, second = write.CANDIDATES
    inside = {k: (lambda top: (top.sum(-1) - top[:, -1]) >= 0.95)(torch.topk(z, k, -1)[0].exp())
              for k in (first, second)}
    assert inside[first][:4].all() and not inside[first][4:].any()  # every path is exercised
    assert inside[second][4:8].all() and not inside[second][8:].any()
    n = len(logits)
    for temperature, top_p in ((1.0, 0.95), (0.7, 0.9), (1.3, 0.5), (1.0, 1.0)):
        for _ in range(10):
            u = rng.random(n)
            got = pick_tokens(torch.from_numpy(logits), torch.from_numpy(u), temperature, top_p)
            assert got.tolist() == [reference_pick(logits[i], u[i], temperature, top_p) for i in range(n)]
            alone = [pick_tokens(torch.from_numpy(logits[i:i + 1]), torch.from_numpy(u[i:i + 1]), temperature,
                                 top_p).item() for i in range(n)]
            assert got.tolist() == alone


def test_kv_cache_sampler_equals_a_full_forward_per_token(writer):
    """Batched, left-padded, prefilled once per question and repeated for its samples, finished rows dropped:
    the same tokens as one unpadded sequence at a time re-run from scratch at every step."""
    model, tok = writer
    from pipeline.prompts import stop_token_ids

    stops = stop_token_ids(tok, model)
    rows = problems(4)
    prompts = [prompt(tok, r["question"]) for r in rows]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    ws = WriteSettings(samples=3, temperature=1.0, top_p=0.9, max_new_tokens=40, seed=5)
    got = sample_solutions(model, prompts, [10, 11, 12, 13], ws, stop_ids=stops, pad_id=tok.pad_token_id)
    n_stopped = 0
    for i, p in enumerate(prompts):
        for s in range(3):
            u = row_uniforms(5, 10 + i, s, ws.max_new_tokens).numpy()
            seq, new = list(p), []
            stopped = False
            for t in range(ws.max_new_tokens):
                with torch.no_grad():
                    logits = model(torch.tensor([seq])).logits[0, -1].float().numpy()
                nxt = reference_pick(logits, u[t], ws.temperature, ws.top_p)
                if nxt in stops:
                    stopped = True
                    break
                new.append(nxt)
                seq.append(nxt)
            assert got[i][s] == (new, stopped), (i, s)
            n_stopped += stopped
    assert n_stopped >= 6  # the trained teacher ends most of its answers


def test_preallocated_kv_cache_equals_transformers_dynamic_cache(writer, monkeypatch):
    """The writer's in-place KV cache (``_PreallocatedLayer``) draws the same tokens as transformers' own
    concatenating ``DynamicCache``, through prefill, the repeat for the samples and rows leaving the batch."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    import pipeline.write as write
    from pipeline.prompts import stop_token_ids

    model, tok = writer
    layers = write._generation_cache(model, 8).layers
    assert all(isinstance(layer, write._PreallocatedLayer) for layer in layers)
    stops = stop_token_ids(tok, model)
    prompts = [prompt(tok, r["question"]) for r in problems(6, seed=4)]
    ws = WriteSettings(samples=3, temperature=1.0, top_p=0.95, max_new_tokens=48, seed=2)
    ours = sample_solutions(model, prompts, list(range(6)), ws, stop_ids=stops, pad_id=tok.pad_token_id)
    lengths = {len(ids) for per_q in ours for ids, _ in per_q}
    assert len(lengths) > 3  # rows finished at different steps and left the batch
    monkeypatch.setattr(write, "_generation_cache", lambda m, capacity: DynamicCache(config=m.config))
    theirs = sample_solutions(model, prompts, list(range(6)), ws, stop_ids=stops, pad_id=tok.pad_token_id)
    assert type(DynamicCache(config=model.config).layers[0]) is DynamicLayer
    assert ours == theirs


def test_when_finished_rows_leave_the_batch_changes_no_sample(writer, monkeypatch):
    """Finished rows wait in the batch until they are more than 1/DROP_FINISHED of it: dropping them at once
    (the KV cache copied at every step a row ends), at the default share, or never gives the same samples."""
    import pipeline.write as write
    from pipeline.prompts import stop_token_ids

    model, tok = writer
    stops = stop_token_ids(tok, model)
    prompts = [prompt(tok, r["question"]) for r in problems(6, seed=9)]
    ws = WriteSettings(samples=3, temperature=1.0, top_p=0.95, max_new_tokens=48, seed=3)
    drops = []
    select = write._PreallocatedLayer.batch_select_indices
    monkeypatch.setattr(write._PreallocatedLayer, "batch_select_indices",
                        lambda self, idx: (drops.append(len(idx)), select(self, idx)))
    out, default = {}, write.DROP_FINISHED
    for share in (10**6, default, 1):  # at once, the default, never
        monkeypatch.setattr(write, "DROP_FINISHED", share)
        drops.clear()
        out[share] = (sample_solutions(model, prompts, list(range(6)), ws, stop_ids=stops,
                                       pad_id=tok.pad_token_id), len(drops))
    assert out[1][1] == 0 and out[10**6][1] > out[default][1] > 0
    assert out[10**6][0] == out[default][0] == out[1][0]
    assert len({len(ids) for per_q in out[1][0] for ids, _ in per_q}) > 3  # rows ended at different steps


def test_samples_do_not_depend_on_the_batch(writer):
    model, tok = writer
    from pipeline.prompts import stop_token_ids

    stops = stop_token_ids(tok, model)
    rows = problems(5)
    prompts = [prompt(tok, r["question"]) for r in rows]
    ws = WriteSettings(samples=2, max_new_tokens=48)
    together = sample_solutions(model, prompts, list(range(5)), ws, stop_ids=stops, pad_id=tok.pad_token_id)
    alone = [sample_solutions(model, [p], [q], ws, stop_ids=stops, pad_id=tok.pad_token_id)[0]
             for q, p in enumerate(prompts)]
    reordered = sample_solutions(model, prompts[::-1], list(range(5))[::-1], ws, stop_ids=stops,
                                 pad_id=tok.pad_token_id)[::-1]
    assert together == alone == reordered
    other_seed = sample_solutions(model, prompts, list(range(5)), WriteSettings(samples=2, max_new_tokens=48,
                                                                                   seed=1),
                                  stop_ids=stops, pad_id=tok.pad_token_id)
    assert other_seed != together


def test_samples_do_not_depend_on_the_thread_count(writer):
    """The demo writes on one thread beside the students (``--jobs`` 2) and on every core with ``--jobs 1``:
    the same solutions either way."""
    model, tok = writer
    from pipeline.prompts import stop_token_ids

    stops = stop_token_ids(tok, model)
    prompts = [prompt(tok, r["question"]) for r in problems(8, seed=12)]
    ws = WriteSettings(samples=2, max_new_tokens=48)
    threads = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(sample_solutions(model, prompts, list(range(8)), ws, stop_ids=stops,
                                        pad_id=tok.pad_token_id))
    finally:
        torch.set_num_threads(threads)
    assert out[0] == out[1]


# --------------------------------------------------------------------------------------------- keeping


def w(q: int, s: int, text: str, stopped: bool = True) -> Written:
    return Written(question=q, sample=s, text=text, tokens=len(text.split()), stopped=stopped)


def test_keeping_by_reference_majority_ties_duplicates_and_all():
    written = [
        # q0 has a reference 5: the two correct samples are kept, one of them twice (a duplicate)
        w(0, 0, "a #### 5"), w(0, 1, "b #### 4"), w(0, 2, "a #### 5"), w(0, 3, "c #### 5"),
        # q1 no reference: 7 wins with 2 of 4 votes; the sample that did not stop never counts
        w(1, 0, "x #### 7"), w(1, 1, "y #### 7"), w(1, 2, "z #### 8"), w(1, 3, "v #### 7", stopped=False),
        # q2 no reference: a 2-2 tie keeps nothing
        w(2, 0, "#### 1"), w(2, 1, "#### 1 again"), w(2, 2, "#### 2"), w(2, 3, "#### 2 again"),
        # q3 no reference: 9 wins with 2 of 4 against 1 + 1 (and one without an answer)
        w(3, 0, "#### 9"), w(3, 1, "#### 9 too"), w(3, 2, "#### 3"), w(3, 3, "no answer"),
    ]
    refs = {0: Decimal(5), 1: None, 2: None, 3: None}
    kept, prov, tot = choose(written, refs, WriteSettings(samples=4))
    assert [(k.question, k.sample) for k in kept] == [(0, 0), (0, 3), (1, 0), (1, 1), (3, 0), (3, 1)]
    assert [p["kept_by"] for p in prov] == ["reference"] * 2 + ["majority"] * 4
    assert [p["correct"] for p in prov] == [True, True, None, None, None, None]
    assert [p["vote_share"] for p in prov] == [0.75, 0.75, 0.5, 0.5, 0.5, 0.5]
    assert all(p["source"] == "teacher" for p in prov) and prov[2]["answer"] == "7"
    assert tot["duplicates"] == 1 and tot["ties"] == 1 and tot["kept"] == 6 and tot["questions_kept"] == 3
    assert tot["teacher_accuracy"] == 0.75 and tot["majority_accuracy"] == 1.0

    # a higher bar: q1's 7 has 2 votes of 4 (the sample that did not stop is no vote) and q3's 9 too, so
    # only q0, kept by its reference, remains
    kept, _, _ = choose(written, refs, WriteSettings(samples=4, min_vote=0.6))
    assert sorted({k.question for k in kept}) == [0]
    # majority ignores the reference: q0's majority answer 5 (3 of 4) keeps the same two samples
    kept, prov, _ = choose(written, refs, WriteSettings(samples=4, keep="majority"))
    assert [(k.question, k.sample) for k in kept][:2] == [(0, 0), (0, 3)] and prov[0]["kept_by"] == "majority"
    assert prov[0]["correct"] is True  # still recorded, not used
    # all: every sample that stopped, duplicates dropped
    kept, _, _ = choose(written, refs, WriteSettings(samples=4, keep="all"))
    assert len(kept) == 16 - 1 - 1
    with pytest.raises(UserError, match="row 2 has no reference"):
        choose(written, refs, WriteSettings(samples=4, keep="reference"))


# ------------------------------------------------------------------------------------- stage one, whole


def config(data: Path, out: Path, **kw) -> TeacherCacheConfig:
    args = {"topk": 8, "temperatures": (1.0,), "max_length": 256, "unit_size": 8, "device": "cpu",
            "progress": False, "write": 3, "write_max_tokens": 48, "encoding": "exact",
            "logprob_dtype": "float32", **kw}
    return TeacherCacheConfig(teacher=str(TEACHER), dataset=str(data), out=out, **args)


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("questions")
    rows = problems(20, seed=3)
    write_jsonl(d / "q.jsonl", [{"question": r["question"]} for r in rows])
    write_jsonl(d / "qa.jsonl", rows)
    return d


@pytest.fixture(scope="module")
def written_cache(tmp_path_factory, questions, writer):
    out = tmp_path_factory.mktemp("written") / "cache"
    return out, run_teacher_cache(config(questions / "q.jsonl", out))


def records_by_text(path: Path, tok) -> dict[str, object]:
    r = open_cache(path, verify_hashes="all")
    out = {}
    for i in range(len(r)):
        rec = r[i]
        out[tok.decode(rec.input_ids[rec.assistant_start:], skip_special_tokens=True)] = rec
    return out


def test_written_rows_are_cached_like_reference_answers(written_cache, questions, writer, tmp_path):
    _, tok = writer
    out, summary = written_cache
    w_ = summary["written"]
    assert w_["samples"] == 60 and w_["questions"] == 20 and 0 < w_["kept"] <= 60
    assert w_["teacher_accuracy"] is None  # no references in a question-only file
    rows = [json.loads(x) for x in (out / "provenance" / PROVENANCE_ROWS).read_text().splitlines()]
    assert [r["seq_id"] for r in rows] == list(range(summary["sequences"]))
    assert {r["source"] for r in rows} == {"teacher"} and all(r["kept_by"] == "majority" for r in rows)
    qs = [json.loads(x)["question"] for x in (questions / "q.jsonl").read_text().splitlines()]
    written = {}
    for line in sorted((out / "generation").glob("unit-*.jsonl")):
        for x in line.read_text().splitlines():
            rec = json.loads(x)
            written[(rec["question"], rec["sample"])] = rec["text"]
    cached = records_by_text(out, tok)
    # every cached sequence is a kept sample's text after its question's prompt
    reader = open_cache(out)
    for r in rows:
        rec = reader[r["seq_id"]]
        text = tok.decode(rec.input_ids[rec.assistant_start:], skip_special_tokens=True)
        assert text == written[(r["row"], r["sample"])]
        assert qs[r["row"]] in tok.decode(rec.input_ids[: rec.assistant_start])

    # the same texts given as reference answers are cached with the same rows
    ref_rows = [{"question": qs[r["row"]], "answer": written[(r["row"], r["sample"])]} for r in rows]
    write_jsonl(tmp_path / "as_ref.jsonl", ref_rows)
    ref_out = tmp_path / "ref"
    s = run_teacher_cache(config(tmp_path / "as_ref.jsonl", ref_out, write=0))
    assert s["sequences"] == summary["sequences"] and s["sources"] == {"reference": len(rows)}
    again = records_by_text(ref_out, tok)
    assert sorted(again) == sorted(cached)
    for text, x in cached.items():
        y = again[text]
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(x.tail_mass, y.tail_mass, rtol=1e-4, atol=1e-7)


def test_rerun_resumes_other_batching_is_identical_and_other_settings_are_refused(written_cache, questions,
                                                                                  tmp_path):
    out, first = written_cache
    again = run_teacher_cache(config(questions / "q.jsonl", out, write_batch=4, batch_tokens=900))
    assert again["units_written"] == 0
    fresh = tmp_path / "other-batching"
    other = run_teacher_cache(config(questions / "q.jsonl", fresh, write_batch=5, batch_tokens=900))
    for u in sorted((out / "generation").glob("unit-*.jsonl")):
        assert (fresh / "generation" / u.name).read_bytes() == u.read_bytes()
    assert other["sequences"] == first["sequences"]
    assert (fresh / "provenance" / PROVENANCE_ROWS).read_bytes() == \
        (out / "provenance" / PROVENANCE_ROWS).read_bytes()
    with pytest.raises(UserError, match="different fingerprint"):
        run_teacher_cache(config(questions / "q.jsonl", out, min_vote=0.9))
    with pytest.raises(UserError, match="different fingerprint"):
        run_teacher_cache(config(questions / "q.jsonl", out, write_temperature=1.0))


def test_references_are_used_to_keep_and_to_measure(questions, tmp_path):
    out = tmp_path / "cache"
    s = run_teacher_cache(config(questions / "qa.jsonl", out, keep="auto"))
    w_ = s["written"]
    assert w_["with_reference"] == 60 and w_["teacher_accuracy"] is not None
    rows = [json.loads(x) for x in (out / "provenance" / PROVENANCE_ROWS).read_text().splitlines()]
    assert rows and all(r["correct"] is True and r["kept_by"] == "reference" for r in rows)
    assert w_["kept"] == len(rows) <= w_["correct"]


def cli() -> list[str]:
    script = Path(sys.executable).parent / "fnet-distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def test_question_only_file_without_write_is_refused_in_one_line(questions, tmp_path):
    args = ["teacher-cache", "--teacher", str(TEACHER), "--dataset", str(questions / "q.jsonl"), "--out",
            str(tmp_path / "c"), "--device", "cpu"]
    res = subprocess.run(cli() + args,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode != 0
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "row 1" in lines[0] and "--write" in lines[0], res.stderr
    assert not (tmp_path / "c" / "manifest.json").exists()


@pytest.mark.slow
def test_kill_9_while_writing_then_resume_equals_uninterrupted(tmp_path, writer):
    rows = problems(96, seed=4)
    write_jsonl(tmp_path / "q.jsonl", [{"question": r["question"]} for r in rows])
    args = ["teacher-cache", "--teacher", str(TEACHER), "--dataset", str(tmp_path / "q.jsonl"), "--topk", "8",
            "--temperatures", "1", "--max-length", "256", "--unit-size", "8", "--device", "cpu",
            "--write", "3", "--write-max-tokens", "48", "--write-batch", "6", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    kill_9_when(cli() + args + ["--out", str(killed)],
                lambda: (killed / "generation" / "unit-000001.jsonl").exists(), env=env)
    done = sorted(p.name for p in (killed / "generation").glob("unit-*.jsonl"))
    assert 2 <= len(done) < 12 and not (killed / "manifest.json").exists()
    for name in done:  # a unit file under its final name is whole: 8 questions x 3 samples
        assert len((killed / "generation" / name).read_text().splitlines()) == 24
    res = subprocess.run(cli() + args + ["--out", str(killed)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    whole = tmp_path / "whole"
    res = subprocess.run(cli() + args + ["--out", str(whole), "--write-batch", "48"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in sorted(p.name for p in (whole / "generation").glob("unit-*.jsonl")):
        assert (killed / "generation" / name).read_bytes() == (whole / "generation" / name).read_bytes()
    assert (killed / "provenance" / PROVENANCE_ROWS).read_bytes() == \
        (whole / "provenance" / PROVENANCE_ROWS).read_bytes()
    a, b = open_cache(killed, verify_hashes="all"), open_cache(whole, verify_hashes="all")
    assert len(a) == len(b)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].input_ids, b[i].input_ids)


@pytest.mark.slow
def test_torchrun_two_ranks_write_what_one_process_writes(written_cache, questions, tmp_path):
    """Units of questions go round-robin to two gloo ranks; every rank reads all units and keeps the same
    solutions: the same written files, provenance and cached sequences as one process."""
    out, _ = written_cache
    two = tmp_path / "two"
    args = ["teacher-cache", "--teacher", str(TEACHER), "--dataset", str(questions / "q.jsonl"), "--out",
            str(two), "--topk", "8", "--temperatures", "1", "--max-length", "256", "--unit-size", "8",
            "--device", "cpu",
            "--write", "3", "--write-max-tokens", "48", "--encoding", "exact", "--logprob-dtype", "float32",
            "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "pipeline", *args]
    res = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    names = sorted(p.name for p in (out / "generation").glob("unit-*.jsonl"))
    assert names == sorted(p.name for p in (two / "generation").glob("unit-*.jsonl")) and len(names) == 3
    for name in names:
        assert (two / "generation" / name).read_bytes() == (out / "generation" / name).read_bytes()
    rows = Path("provenance") / PROVENANCE_ROWS
    assert (two / rows).read_bytes() == (out / rows).read_bytes()
    a, b = open_cache(out, verify_hashes="all"), open_cache(two, verify_hashes="all")
    assert len(a) == len(b)
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i].input_ids, b[i].input_ids)


def test_writing_defaults_are_declared_once():
    """The command's and the config's writing defaults are WriteSettings' (a changed default cannot drift)."""
    import inspect

    from pipeline.commands.teacher_cache import teacher_cache

    params = inspect.signature(teacher_cache).parameters
    for option, field in (("write_temperature", "temperature"), ("write_top_p", "top_p"),
                          ("write_max_tokens", "max_new_tokens"), ("keep", "keep"), ("min_vote", "min_vote")):
        assert params[option].default.default == getattr(WriteSettings, field), option
        assert getattr(TeacherCacheConfig, option) == getattr(WriteSettings, field), option


def test_batch_tokens_below_the_longest_sequence_and_dropped_rows_are_said_in_one_line(questions, tmp_path):
    """A --batch-tokens smaller than any sequence is refused before anything is written; rows left out by
    --max-length are announced, not only counted in the closing summary."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = ["teacher-cache", "--teacher", str(TEACHER), "--dataset", str(questions / "qa.jsonl"), "--topk",
            "8", "--temperatures", "1", "--device", "cpu", "--no-progress"]
    res = subprocess.run(cli() + base + ["--out", str(tmp_path / "a"), "--batch-tokens", "1"],
                         capture_output=True, text=True, timeout=120, env=env)
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "--batch-tokens 1 is smaller than the longest sequence" in lines[0]
    assert not (tmp_path / "a" / "manifest.json").exists()
    from pipeline.data import load_examples, load_tokenizer, tokenize_examples

    lengths = sorted(len(s) for s in tokenize_examples(load_tokenizer(str(TEACHER)),
                                                       load_examples(str(questions / "qa.jsonl"))).seqs)
    cut = lengths[len(lengths) // 2]  # about half the rows are longer
    dropped = sum(n > cut for n in lengths)
    res = subprocess.run(cli() + base + ["--out", str(tmp_path / "b"), "--max-length", str(cut)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert f"note: {dropped} of {len(lengths)} rows are longer than --max-length {cut} and are left out" \
        in res.stderr
    assert f"dropped {dropped}" in res.stdout
