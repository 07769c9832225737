"""cache.format on real files: round trips, corruption, resume, locks, ranks, verify and the CLI."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from cache.format import (
    FORMAT_VERSION,
    CacheRecord,
    CacheSettings,
    CacheWriter,
    open_cache,
    verify_cache,
)

VOCAB = 1000
FP = {"teacher": "tiny", "dataset_hash": "abc", "max_length": 64}


def make_record(rng: np.random.Generator, seq_id: int, s: CacheSettings) -> CacheRecord:
    L = int(rng.integers(4, 40))
    start = int(rng.integers(1, L))
    mask = np.zeros(L, dtype=bool)
    mask[start:] = rng.random(L - start) < 0.8
    mask[start] = True
    n, k, nT = int(mask.sum()), s.topk, len(s.temperatures)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    lp = -np.sort(np.abs(logits), axis=1)
    rec = dict(
        seq_id=seq_id, input_ids=rng.integers(0, VOCAB, L).astype(np.int32), loss_mask=mask,
        assistant_start=start, topk_ids=rng.integers(0, VOCAB, (n, k)).astype(np.int32),
        topk_logprobs=lp.astype(s.dtype), topk_shift=rng.normal(size=(n, nT)).astype(np.float32),
        tail_mass=rng.random((n, nT)).astype(np.float32),
    )
    if s.samples:
        offs, ids, cnts = [0], [], []
        for _ in range(n):
            draws = rng.integers(0, VOCAB, s.samples)
            u, c = np.unique(draws, return_counts=True)
            ids.append(u)
            cnts.append(c)
            offs.append(offs[-1] + len(u))
        rec.update(sample_offsets=np.array(offs, np.int64), sample_ids=np.concatenate(ids).astype(np.int32),
                   sample_counts=np.concatenate(cnts).astype(np.int32))
    return CacheRecord(**rec)


def make_units(s: CacheSettings, num_units: int = 3, per_unit: int = 5, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [[make_record(rng, u * per_unit + j, s) for j in range(per_unit)] for u in range(num_units)]


def write_cache(path: Path, s: CacheSettings, units, fp=FP) -> dict:
    with CacheWriter(path, fingerprint=fp, settings=s) as w:
        for u, recs in enumerate(units):
            w.write_unit(u, recs)
        return w.finalize(len(units))


def assert_same(a: CacheRecord, b: CacheRecord) -> None:
    assert a.seq_id == b.seq_id and a.assistant_start == b.assistant_start
    for f in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "topk_shift", "tail_mass",
              "sample_offsets", "sample_ids", "sample_counts"):
        x, y = getattr(a, f), getattr(b, f)
        if x is None or y is None:
            assert x is None and y is None, f
            continue
        assert x.dtype == np.asarray(y).dtype, f
        np.testing.assert_array_equal(x, y, err_msg=f)


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
@pytest.mark.parametrize("dtype,samples", [("float16", 0), ("float32", 8)])
def test_round_trip(tmp_path, fmt, dtype, samples):
    s = CacheSettings(topk=4, vocab_size=VOCAB, samples=samples, temperatures=(1.0, 2.0), dtype=dtype,
                      format=fmt)
    units = make_units(s)
    m = write_cache(tmp_path / "c", s, units)
    assert m["format"] == fmt and m["format_version"] == FORMAT_VERSION
    r = open_cache(tmp_path / "c")
    flat = [rec for u in units for rec in u]
    assert len(r) == len(flat)
    np.testing.assert_array_equal(r.lengths, [len(x.input_ids) for x in flat])
    np.testing.assert_array_equal(r.num_supervised, [int(x.loss_mask.sum()) for x in flat])
    for i, rec in enumerate(flat):
        assert_same(r[i], rec)
    assert r.topk == 4 and r.samples == samples and r.temperatures == (1.0, 2.0) and r.vocab_size == VOCAB
    assert r.temperature_index(2.0) == 1
    assert verify_cache(tmp_path / "c") == []
    r2 = pickle.loads(pickle.dumps(r))
    assert_same(r2[len(flat) - 1], flat[-1])
