"""The teacher-cache command end to end on CPU: content through the real reader, kill -9 + resume, torchrun
with two gloo ranks, fingerprint refusal. Every variant must equal one uninterrupted single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_9_when, torchrun_two_nodes  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.util import UserError
from pipeline.data import load_examples, tokenize_examples
from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

COMMON = {"limit": 8, "max_length": 128, "overflow": "truncate", "topk": 8, "samples": 4,
          "temperatures": (1.0, 2.0), "logprob_dtype": "float32", "unit_size": 3, "encoding": "exact"}


def config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, **kw) -> TeacherCacheConfig:
    args = {**COMMON, "batch_tokens": 4096, "progress": False, **kw}
    return TeacherCacheConfig(teacher=str(tiny_qwen_dir), tokenizer=str(qwen_tokenizer_dir),
                              dataset=str(gsm8k_slice), out=out, **args)


def cli_args(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, batch_tokens) -> list[str]:
    return ["teacher-cache", "--teacher", str(tiny_qwen_dir), "--tokenizer", str(qwen_tokenizer_dir),
            "--dataset", str(gsm8k_slice), "--out", str(out), "--limit", str(COMMON["limit"]),
            "--max-length", str(COMMON["max_length"]), "--overflow", COMMON["overflow"],
            "--topk", str(COMMON["topk"]), "--samples", str(COMMON["samples"]), "--temperatures", "1,2",
            "--logprob-dtype", "float32", "--unit-size", str(COMMON["unit_size"]), "--encoding", "exact",
            "--batch-tokens", str(batch_tokens), "--device", "cpu", "--no-progress"]


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "fnet-distill"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = open_cache(a, verify_hashes="all"), open_cache(b, verify_hashes="all")
    assert ra.fingerprint_digest == rb.fingerprint_digest
    assert len(ra) == len(rb)
    xs = {ra[i].seq_id: ra[i] for i in range(len(ra))}
    ys = {rb[i].seq_id: rb[i] for i in range(len(rb))}
    assert sorted(xs) == sorted(ys) == list(range(len(ra)))
    for sid, x in xs.items():
        y = ys[sid]
        assert x.assistant_start == y.assistant_start
        for f in ("input_ids", "loss_mask", "topk_ids", "sample_offsets", "sample_ids", "sample_counts"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f"seq {sid} {f}")
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(x.topk_shift, y.topk_shift, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(x.tail_mass, y.tail_mass, rtol=1e-4, atol=1e-8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice):
    out = tmp_path_factory.mktemp("ref") / "cache"
    summary = run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out))
    return out, summary


def test_cache_content_through_the_reader(reference, tiny_qwen_dir, qwen_tokenizer, gsm8k_slice):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = reference
    data = tokenize_examples(qwen_tokenizer, load_examples(str(gsm8k_slice), limit=COMMON["limit"]),
                             max_length=COMMON["max_length"], overflow=COMMON["overflow"])
    reader = open_cache(out, verify_hashes="all")
    m = reader.manifest
    n = len(data.seqs)
    assert summary["sequences"] == len(reader) == n and summary["shards"] == -(-n // COMMON["unit_size"])
    assert m["num_supervised"] == data.num_supervised == summary["supervised_tokens"]
    assert m["stats"]["dropped"] == data.dropped and m["stats"]["truncated"] == data.truncated > 0
    assert m["tokenizer"]["eos_token_id"] == qwen_tokenizer.eos_token_id
    assert m["tokenizer"]["pad_token_id"] == qwen_tokenizer.pad_token_id
    assert reader.topk == COMMON["topk"] and reader.samples == COMMON["samples"]
    assert reader.vocab_size == 151_936 and reader.temperatures == (1.0, 2.0)
    fp = reader.fingerprint
    for key in ("teacher", "tokenizer_hash", "dataset", "chat_template", "max_length", "overflow", "topk",
                "samples", "temperatures", "dtypes", "seed"):
        assert key in fp
    assert fp["dtypes"] == {"teacher_compute": "float32", "logprobs": "float32"}
    saved = AutoTokenizer.from_pretrained(reader.tokenizer_dir)
    assert saved.get_vocab() == qwen_tokenizer.get_vocab()
    assert saved.chat_template == qwen_tokenizer.chat_template

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir).eval()
    for i in range(len(reader)):
        r = reader[i]
        s = data.seqs[r.seq_id]
        np.testing.assert_array_equal(r.input_ids, s.input_ids)
        np.testing.assert_array_equal(r.loss_mask, s.loss_mask)
        assert r.assistant_start == s.assistant_start == int(np.flatnonzero(r.loss_mask)[0])
        if i < 2:
            with torch.no_grad():
                logits = model(torch.from_numpy(r.input_ids.astype(np.int64))[None]).logits[0]
            t = np.flatnonzero(r.loss_mask)
            ref_v, ref_i = torch.log_softmax(logits[t - 1].double(), -1).topk(COMMON["topk"], -1)
            np.testing.assert_array_equal(r.topk_ids, ref_i.numpy())
            np.testing.assert_allclose(r.topk_logprobs, ref_v.numpy(), rtol=1e-5, atol=2e-4)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(reference, tmp_path, tiny_qwen_dir,
                                                         qwen_tokenizer_dir, gsm8k_slice):
    out = tmp_path / "cache"
    cmd = cli_command() + cli_args(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, batch_tokens=300)
    journal = out / "journal.rank0.jsonl"
    kill_9_when(cmd, lambda: journal.exists() and any(json.loads(x).get("type") == "unit"
                                                      for x in journal.read_text().splitlines()
                                                      if x.endswith("}")), env=env(), poll=0.02)
    assert not (out / "manifest.json").exists()
    with pytest.raises(UserError):
        open_cache(out)

    again = run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, batch_tokens=1000))
    assert 1 <= again["units_skipped"] < again["shards"] == reference[1]["shards"]
    assert again["units_skipped"] + again["units_written"] == again["shards"]
    assert_same_cache(out, reference[0])


@pytest.mark.slow
def test_torchrun_two_processes_equals_one(reference, tmp_path, tiny_qwen_dir, qwen_tokenizer_dir,
                                           gsm8k_slice):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pipeline"]
    cmd += cli_args(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, batch_tokens=700)
    res = subprocess.run(cmd, env={**env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        lines = (out / f"journal.rank{rank}.jsonl").read_text().splitlines()
        units = [json.loads(x)["unit"] for x in lines if json.loads(x).get("type") == "unit"]
        assert units and all(u % 2 == rank for u in units)
    assert_same_cache(out, reference[0])


@pytest.mark.slow
def test_two_nodes_equal_one_process(reference, tmp_path, tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice):
    """Two torchrun agents (two "machines", one process each, a c10d rendezvous on 127.0.0.1) share one --out,
    as nodes share a filesystem: each rank journals its own units, rank 0 finalises from both journals."""
    out = tmp_path / "cache"
    args = ["-m", "pipeline", *cli_args(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, 700)]
    for rc, err in torchrun_two_nodes(args, env={**env(), "OMP_NUM_THREADS": "1"}):
        assert rc == 0, err[-3000:]
    units = {}
    for rank in (0, 1):
        lines = (out / f"journal.rank{rank}.jsonl").read_text().splitlines()
        units[rank] = [json.loads(x)["unit"] for x in lines if json.loads(x).get("type") == "unit"]
    assert units[0] and units[1] and sorted(units[0] + units[1]) == list(range(reference[1]["shards"]))
    assert_same_cache(out, reference[0])


def test_rerun_resumes_everything_and_other_settings_are_refused(reference, tiny_qwen_dir, qwen_tokenizer_dir,
                                                                 gsm8k_slice):
    out, _ = reference
    before = (out / "manifest.json").read_text()
    summary = run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, batch_tokens=500))
    assert summary["units_written"] == 0 and summary["units_skipped"] == summary["shards"]
    assert json.loads(before)["fingerprint"] == json.loads((out / "manifest.json").read_text())["fingerprint"]
    with pytest.raises(UserError, match="different fingerprint"):
        run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, topk=9))
    with pytest.raises(UserError, match="different fingerprint"):
        run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, limit=7))


def test_zarr_format_holds_the_same_content(reference, tmp_path, tiny_qwen_dir, qwen_tokenizer_dir,
                                            gsm8k_slice):
    out = tmp_path / "zarr"
    run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, format="zarr"))
    assert open_cache(out).manifest["format"] == "zarr"
    ra, rb = open_cache(out), open_cache(reference[0])
    for i in range(len(ra)):
        x, y = ra[i], rb[i]
        assert x.seq_id == y.seq_id
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_array_equal(x.topk_logprobs, y.topk_logprobs)


def test_compact_encoding_from_the_real_teacher_matches_the_exact_cache(reference, tmp_path, tiny_qwen_dir,
                                                                        qwen_tokenizer_dir, gsm8k_slice):
    from cache.codec import row_kl
    from cache.verify import verify_cache

    out = tmp_path / "compact"
    summary = run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out,
                                       encoding="compact"))
    assert verify_cache(out) == []
    rc, rx = open_cache(out), open_cache(reference[0])
    assert rc.settings.encoding == "compact" and rc.fingerprint["encoding"]["name"] == "compact"
    assert rc.fingerprint_digest != rx.fingerprint_digest
    bound = (1 / 16 + 2e-3) ** 2 / 8
    for i in range(len(rc)):
        c, x = rc[i], rx[i]
        for f in ("input_ids", "loss_mask", "topk_ids", "sample_offsets", "sample_ids", "sample_counts"):
            np.testing.assert_array_equal(getattr(c, f), getattr(x, f), err_msg=f)
        assert (row_kl(x, c, (1.0, 2.0)) <= bound).all()
    fid = rc.manifest["stats"]["fidelity"]
    assert fid["rows"] == rc.manifest["num_supervised"] and max(fid["max_kl"]) <= bound
    assert summary["bytes_per_supervised_token"] < reference[1]["bytes_per_supervised_token"] / 2
    with pytest.raises(UserError, match="different fingerprint"):
        run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, encoding="compact",
                                 top_p=0.9))
    with pytest.raises(UserError, match="--top-p must be in"):
        config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, encoding="compact", top_p=1.5)
    with pytest.raises(UserError, match="needs the compact encoding"):
        config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, out, top_p=0.9)


def test_bad_command_inputs(tmp_path, tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, tmp_path / "file")
    with pytest.raises(UserError, match="--unit-size"):
        config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, tmp_path / "c", unit_size=0)
    c = tmp_path / "c"
    with pytest.raises(UserError, match="larger than the teacher's vocabulary"):
        run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, c, topk=200_000))
    with pytest.raises(UserError, match="raise --max-length"):
        run_teacher_cache(config(tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice, c, max_length=20,
                                 overflow="drop"))
    res = subprocess.run(cli_command() + ["teacher-cache", "--teacher", str(tmp_path / "missing"),
                                          "--dataset", str(gsm8k_slice), "--out", str(tmp_path / "c")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: ") and "does not exist" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
