"""The teacher pass against an independent full-vocabulary reference (plain HF forward, log_softmax, topk),
batch invariance, sampling statistics and the teacher-side input errors."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from cache.util import UserError
from pipeline.data import load_examples, tokenize_examples
from pipeline.teacher import (
    TargetSettings,
    check_token_ids,
    load_teacher,
    teacher_targets,
    token_budget_batches,
)

TEMPS = (1.0, 2.0)


@pytest.fixture(scope="module")
def teacher(tiny_qwen_dir):
    return load_teacher(str(tiny_qwen_dir), device="cpu")


@pytest.fixture(scope="module")
def seqs(qwen_tokenizer, gsm8k_slice):
    data = tokenize_examples(qwen_tokenizer, load_examples(str(gsm8k_slice), limit=4), max_length=140,
                             overflow="truncate")
    return data.seqs


def reference(model, seq) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 logits (n, V) of the rows that predict supervised tokens, from one plain full forward."""
    with torch.no_grad():
        logits = model(torch.from_numpy(seq.input_ids.astype(np.int64))[None]).logits[0]  # (L, V)
    t = np.flatnonzero(seq.loss_mask)
    return logits[t - 1].double(), torch.from_numpy(seq.input_ids[t].astype(np.int64))


def test_loaded_teacher_is_fp32_eval_with_file_identity(teacher, tiny_qwen_dir):
    assert teacher.dtype == torch.float32 and not teacher.model.training
    assert teacher.vocab_size == 151_936
    assert teacher.identity["kind"] == "local" and teacher.identity["hash"].startswith("xxh3_128:")


def test_topk_shift_and_tail_match_full_vocabulary_reference(teacher, seqs, qwen_tokenizer):
    k = 16
    settings = TargetSettings(topk=k, temperatures=TEMPS, chunk_positions=50)
    out = teacher_targets(teacher, seqs, settings, qwen_tokenizer.pad_token_id)
    for s, t in zip(seqs, out):
        z, _ = reference(teacher.model, s)
        n = int(s.loss_mask.sum())
        assert t.topk_ids.shape == (n, k) and t.topk_ids.dtype == np.int32
        ref_lp = torch.log_softmax(z, dim=-1)
        ref_v, ref_i = ref_lp.topk(k, dim=-1)
        np.testing.assert_array_equal(t.topk_ids, ref_i.numpy())
        np.testing.assert_allclose(t.topk_logprobs, ref_v.numpy(), rtol=1e-5, atol=2e-4)
        ids = torch.from_numpy(t.topk_ids.astype(np.int64))
        for i, temp in enumerate(TEMPS):
            lp_t = torch.log_softmax(z / temp, dim=-1)  # (n, V) fp64
            in_top = torch.zeros_like(lp_t, dtype=torch.bool).scatter_(1, ids, True)
            ref_tail = lp_t.exp().masked_fill(in_top, 0).sum(-1).numpy()
            np.testing.assert_allclose(t.tail_mass[:, i], ref_tail, rtol=2e-4, atol=1e-9)
            got = t.topk_logprobs / temp + t.topk_shift[:, [i]]
            np.testing.assert_allclose(got, lp_t.gather(1, ids).numpy(), rtol=1e-5, atol=2e-4)
        assert np.all(t.topk_shift[:, 0] == 0)


def test_full_vocabulary_k_has_zero_tail(teacher, seqs, qwen_tokenizer):
    s = min(seqs, key=lambda x: int(x.loss_mask.sum()))
    settings = TargetSettings(topk=teacher.vocab_size, temperatures=TEMPS, chunk_positions=16)
    (t,) = teacher_targets(teacher, [s], settings, qwen_tokenizer.pad_token_id)
    assert np.all(t.tail_mass == 0.0)
    np.testing.assert_allclose(np.exp(t.topk_logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_batching_and_chunking_do_not_change_content(teacher, seqs, qwen_tokenizer):
    pad = qwen_tokenizer.pad_token_id
    a = teacher_targets(teacher, seqs[:3], TargetSettings(topk=8, samples=32, chunk_positions=64), pad)
    b = [teacher_targets(teacher, [s], TargetSettings(topk=8, samples=32, chunk_positions=19), pad)[0]
         for s in seqs[:3]]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(x.tail_mass, y.tail_mass, rtol=1e-4, atol=1e-8)
        for f in ("sample_offsets", "sample_ids", "sample_counts"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))


def test_same_batches_give_bit_identical_content(teacher, seqs, qwen_tokenizer):
    pad = qwen_tokenizer.pad_token_id
    st = TargetSettings(topk=8, samples=16, chunk_positions=64, logprob_dtype="float16")
    a, b = (teacher_targets(teacher, seqs[:3], st, pad) for _ in range(2))
    for x, y in zip(a, b):
        for f in ("topk_ids", "topk_logprobs", "topk_shift", "tail_mass", "sample_offsets", "sample_ids",
                  "sample_counts"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f)


def test_samples_are_unbiased(teacher, seqs, qwen_tokenizer):
    """Every draw is an independent Bernoulli for "id == top-1"; with M rows of N draws, Hoeffding gives
    P(|mean(freq - p)| > eps) <= 2 exp(-2 M N eps^2), and per row P(|freq - p| > eps_row) <= 2 exp(-2 N eps^2)
    (a union bound over rows and the top-3 ids). delta = 1e-6 overall."""
    n_draws, delta = 2000, 1e-6
    settings = TargetSettings(topk=3, samples=n_draws, seed=7, chunk_positions=64)
    out = teacher_targets(teacher, seqs[:2], settings, qwen_tokenizer.pad_token_id)
    freqs, probs = [], []
    for t in out:
        off = t.sample_offsets
        for j in range(t.topk_ids.shape[0]):
            ids, counts = t.sample_ids[off[j]: off[j + 1]], t.sample_counts[off[j]: off[j + 1]]
            assert counts.sum() == n_draws and np.all(np.diff(ids) > 0) and np.all(counts > 0)
            got = dict(zip(ids.tolist(), counts.tolist()))
            freqs.append([got.get(int(i), 0) / n_draws for i in t.topk_ids[j]])
            probs.append(np.exp(t.topk_logprobs[j].astype(np.float64)))
    freqs, probs = np.array(freqs), np.array(probs)  # (M, 3)
    m = freqs.shape[0]
    eps_row = math.sqrt(math.log(2 * 3 * m / (delta / 2)) / (2 * n_draws))
    assert np.abs(freqs - probs).max() <= eps_row
    eps_mean = math.sqrt(math.log(2 / (delta / 2)) / (2 * m * n_draws))
    assert abs((freqs[:, 0] - probs[:, 0]).mean()) <= eps_mean
    assert probs[:, 0].std() > 0.05


def test_token_budget_batches():
    lengths = [50, 40, 40, 30, 10, 10, 10]
    batches = token_budget_batches(lengths, 100)
    assert sum(batches, []) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    assert token_budget_batches([500, 20], 100) == [[0], [1]]


def test_settings_and_vocab_errors():
    with pytest.raises(UserError, match="--topk"):
        TargetSettings(topk=0)
    with pytest.raises(UserError, match="larger than the teacher's vocabulary"):
        TargetSettings(topk=200_000).check_vocab(151_936)
    with pytest.raises(UserError, match="--temperatures"):
        TargetSettings(temperatures=(1.0, -2.0))
    with pytest.raises(UserError, match="teacher's vocabulary has only 1000"):
        check_token_ids(151_646, 151_645, 1000)


def test_missing_teacher_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(str(tmp_path / "no-model"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_teacher(str(tmp_path / "empty"), device="cpu")


def test_small_vocab_teacher_is_refused_by_the_command(tmp_path, qwen_tokenizer_dir, gsm8k_slice):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    small = tmp_path / "small"
    cfg = Qwen2Config(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=None, bos_token_id=None,
                      eos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(small)
    cfg = TeacherCacheConfig(teacher=str(small), tokenizer=str(qwen_tokenizer_dir), dataset=str(gsm8k_slice),
                             out=tmp_path / "cache", limit=2, progress=False)
    with pytest.raises(UserError, match="vocabulary has only 1000"):
        run_teacher_cache(cfg)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_hub_unreachable_teacher_says_to_pass_a_local_folder(tmp_path):
    code = ("from pipeline.teacher import load_teacher\n"
            "from cache.util import UserError\n"
            "try:\n    load_teacher('Qwen/Qwen2-0.5B-Instruct', device='cpu')\n"
            "except UserError as e:\n    print('USERERROR', e)\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [x for x in out.stdout.splitlines() if x.startswith("USERERROR")]
    assert line, out.stdout + out.stderr
    assert "pass a local model folder with --teacher" in line[0]
