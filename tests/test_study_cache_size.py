"""bench/study_cache_size.py: the train caches it derives from one full-distribution cache equal what a top-k
teacher pass writes (ids, log-probs, exact tails per temperature), in every encoding it uses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from helpers import V, write_bigram_cache  # tests/ is on sys.path under pytest

from cache.codec import row_kl
from cache.format import open_cache, verify_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_cache_size as study  # noqa: E402


def test_derived_caches_equal_a_top_k_teacher_pass(tmp_path):
    full = write_bigram_cache(tmp_path / "full", n=6, k=V, samples=20)
    draws = full  # the study's second pass (12 draws, same sequences); here the same cache stands in
    ref = open_cache(full)
    sizes = {}
    for name in ("k4", "k4-compact", "top-p0.9", "rs12", "rs50"):
        m = study.write_variant(full, draws, tmp_path / name, name, V)
        sizes[name] = m["stats"]["bytes_per_supervised_token"]
        assert verify_cache(tmp_path / name) == [], name
        r = open_cache(tmp_path / name)
        for i in range(len(r)):
            x, y = ref[i], r[i]
            np.testing.assert_array_equal(x.input_ids, y.input_ids)
            if name.startswith("k4"):
                # the k = 4 rows of an independent top-4 computation on the same teacher logits
                lp_full = x.topk_logprobs.astype(np.float64)
                p = [np.exp(lp_full / t + x.topk_shift[:, j:j + 1]) for j, t in enumerate(study.TEMPS)]
                want_tail = np.stack([1 - pt[:, :4].sum(1) for pt in p], 1)
                np.testing.assert_array_equal(y.topk_ids, x.topk_ids[:, :4])
                np.testing.assert_allclose(y.tail_mass, want_tail, rtol=1e-3, atol=1e-6)
            if name == "k4":
                np.testing.assert_array_equal(y.topk_logprobs, x.topk_logprobs[:, :4])
            if name in ("rs12", "rs50"):
                np.testing.assert_array_equal(y.sample_ids, x.sample_ids)
            if name == "rs50":
                np.testing.assert_array_equal(y.sample_counts, x.sample_counts)
            if name == "top-p0.9":
                kept = y.topk_logprobs > -1e3
                assert (np.exp(x.topk_logprobs.astype(np.float64))[kept].sum() > 0)
                assert (row_kl(x, y, study.TEMPS) <= (1 / 16 + 2e-3) ** 2 / 8).all()
    assert sizes["k4-compact"] < sizes["k4"]
