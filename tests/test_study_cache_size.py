"""bench/study_cache_size.py: the train caches it derives from one full-distribution cache equal what a top-k
teacher pass writes (ids, log-probs, exact tails per temperature), in every encoding it uses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from helpers import V, write_bigram_cache  # tests/ is on sys.path under pytest

from cache.codec import row_kl
from cache.reader import open_cache
from cache.verify import verify_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study_cache_size as study  # noqa: E402


def test_derived_caches_equal_a_top_k_teacher_pass(tmp_path):
    full = write_bigram_cache(tmp_path / "full", n=6, k=V, samples=20)
    draws = full  # the study's second pass (12 draws, same sequences); here the same cache stands in
    ref = open_cache(full)
    sizes = {}
    for name in ("k4", "k4-compact", "top-p0.9-k32", "rs12", "rs50"):
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
            if name == "top-p0.9-k32":  # a top-32 pass, then adaptive k on it
                x32 = study.derive(x, 32, None)
                kept = y.topk_logprobs > -1e3
                assert (np.exp(x32.topk_logprobs.astype(np.float64))[kept].sum() > 0)
                np.testing.assert_array_equal(y.topk_ids[kept], x32.topk_ids[kept])
                assert (row_kl(x32, y, study.TEMPS) <= (1 / 16 + 2e-3) ** 2 / 8).all()
    assert sizes["k4-compact"] < sizes["k4"]


def test_the_table_says_which_differences_are_within_the_seed_spread():
    row = {"cache": "k64", "kd": "topk_tail", "alpha": 0.2, "bytes_per_supervised_token": 80.0, "seeds": 3,
           "val_top1": 0.8, "val_top1_std": 0.01}
    ref = {**row, "variant": "tail-k64", "val_ce": 0.50, "val_ce_std": 0.02, "val_kl": 0.30,
           "val_kl_std": 0.01, "accuracy": 0.20, "accuracy_std": 0.03}
    near = {**row, "variant": "top-p0.9-k32", "val_ce": 0.51, "val_ce_std": 0.01, "val_kl": 0.35,
            "val_kl_std": 0.02, "accuracy": 0.18, "accuracy_std": 0.01}
    ce = {**near, "variant": "ce", "alpha": 1.0, "val_ce": 0.60}
    seeds = {"tail-k64": [(0.48, 0.29, 0.20), (0.52, 0.31, 0.20)],
             "top-p0.9-k32": [(0.49, 0.34, 0.19), (0.53, 0.36, 0.17)]}
    runs = {v: [{"seed": i, "val_ce": a, "val_kl": b, "accuracy": c} for i, (a, b, c) in enumerate(rs)]
            for v, rs in seeds.items()}
    md = study.markdown([ref, near, ce], runs)
    assert "| ce | CE only | 0 (labels only) |" in md
    line = next(x for x in md.splitlines() if x.startswith("| top-p0.9-k32 | +"))
    # val CE +0.01 inside the spread 0.02; val KL +0.05 outside 0.02; accuracy -2.0 points inside 3.0;
    # paired: CE +0.01 on both seeds, KL +0.05 on both, answers -1 and -3 points
    assert line == ("| top-p0.9-k32 | +0.0100 [0.0200] | +0.0500 [0.0200] (outside) | -2.0 [3.0] | "
                    "+0.0100 ± 0.0000 | +0.0500 ± 0.0000 | -2.0 ± 1.4 |")
    assert next(x for x in md.splitlines() if x.startswith("| ce | +")).endswith("| - | - | - |")
