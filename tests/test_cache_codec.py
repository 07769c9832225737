"""The compact cache encoding (cache.codec) against exact float64 teacher rows: round trips within the stated
bound at awkward sizes, id packing up to Qwen2's largest id, the topk_tail loss on decoded rows, adaptive k
mass accounting, a flipped byte in a packed shard, and resume after kill -9 of a real writer process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import teacher_rows, teacher_samples  # tests/ is on sys.path under pytest

from cache import codec
from cache.reader import open_cache
from cache.schema import CacheRecord, CacheSettings, normalize_record
from cache.verify import verify_cache
from cache.writer import CacheWriter

TEMPS = (1.0, 2.0)
STEP = 1.0 / 16
# KL(p || q) <= w^2 / 8 when log(p/q) spans a range of width w on the row's bins: the log-prob error is
# at most STEP / 2 each way and the 16-bit tail code adds <= 6.8e-4.
BOUND = (STEP + 2e-3) ** 2 / 8


def exact_record(rng: np.random.Generator, V: int, k: int, n: int, L: int | None = None, samples: int = 0,
                 scale: float = 3.0, seq_id: int = 0) -> CacheRecord:
    L = L if L is not None else n + 3
    z = rng.normal(size=(n, V)) * scale
    ids, lp, shift, tail = teacher_rows(z, k, TEMPS) if n else (np.zeros((0, k), int), np.zeros((0, k)),
                                                               np.zeros((0, 2)), np.zeros((0, 2)))
    mask = np.zeros(L, dtype=bool)
    mask[L - n:] = True
    rec = CacheRecord(seq_id=seq_id, input_ids=rng.integers(0, V, L).astype(np.int32), loss_mask=mask,
                      assistant_start=L - n, topk_ids=ids.astype(np.int32),
                      topk_logprobs=lp.astype(np.float32), topk_shift=shift.astype(np.float32),
                      tail_mass=tail.astype(np.float32))
    if samples:
        for name, value in teacher_samples(rng, z, samples).items():
            setattr(rec, name, value)
    return rec


def settings(V: int, k: int, **kw) -> CacheSettings:
    return CacheSettings(topk=k, vocab_size=V, temperatures=TEMPS, dtype="float32", encoding="compact",
                         lp_step=STEP, **kw)


def check_decoded(r: CacheRecord, d: CacheRecord, s: CacheSettings) -> None:
    np.testing.assert_array_equal(d.input_ids, r.input_ids)
    np.testing.assert_array_equal(d.loss_mask, r.loss_mask)
    assert d.topk_ids.shape == r.topk_ids.shape and d.topk_ids.dtype == np.int32
    assert d.topk_logprobs.dtype == np.float32 and d.topk_shift.dtype == d.tail_mass.dtype == np.float32
    n = r.topk_ids.shape[0]
    if s.top_p is None:
        np.testing.assert_array_equal(d.topk_ids, r.topk_ids)
        np.testing.assert_allclose(d.tail_mass, r.tail_mass, rtol=7e-4, atol=0)
    assert (np.diff(d.topk_logprobs, axis=1) <= 0).all() and (d.topk_logprobs <= 0).all()
    for i, t in enumerate(TEMPS):  # kept + tail == 1 at every temperature
        p = np.exp(d.topk_logprobs.astype(np.float64) / t + d.topk_shift[:, i:i + 1]).sum(1)
        np.testing.assert_allclose(p + d.tail_mass[:, i], np.ones(n), atol=2e-6)
    kl = codec.row_kl(r, d, TEMPS)
    assert (kl >= -1e-9).all() and (kl <= BOUND).all(), (kl.max(0), BOUND)
    if s.samples:
        for f in ("sample_offsets", "sample_ids", "sample_counts"):
            np.testing.assert_array_equal(getattr(d, f), getattr(r, f), err_msg=f)


@pytest.mark.parametrize("V,k,n", [(257, 1, 9), (257, 257, 7), (257, 16, 0), (1000, 64, 12),
                                   (151936, 4, 5)])
@pytest.mark.parametrize("mode", ["fixed", "top_p", "samples"])
def test_round_trip_within_bound_at_awkward_sizes(V, k, n, mode):
    rng = np.random.default_rng(V + k + n)
    kw = {"top_p": 0.8} if mode == "top_p" else {"samples": 12} if mode == "samples" else {}
    s = settings(V, k, **kw)
    r = normalize_record(exact_record(rng, V, k, n, samples=kw.get("samples", 0)), s)
    if k == V:
        r.tail_mass[:] = 0.0  # what the teacher stores when nothing is dropped
    d = codec.decode_record(r.seq_id, r.assistant_start, codec.encode_record(r, s), s)
    check_decoded(r, d, s)
    if k == V and mode == "fixed":
        assert (d.tail_mass == 0).all()


def test_a_nearly_flat_teacher_keeps_its_tiny_kept_mass():
    """Top-1 of a near-uniform 20,000-id row holds ~1e-4 of the mass: the tail (~0.9999) cannot carry it
    in 16 bits, so the kept mass is what gets coded; KL stays within the bound at both temperatures."""
    rng = np.random.default_rng(4)
    s = settings(20000, 1)
    r = normalize_record(exact_record(rng, 20000, 1, 8, scale=0.3), s)
    assert (r.tail_mass[:, 0] > 0.999).all()
    d = codec.decode_record(0, r.assistant_start, codec.encode_record(r, s), s)
    check_decoded(r, d, s)
    for i, t in enumerate(TEMPS):
        kept_exact = np.exp(r.topk_logprobs[:, 0] / t + r.topk_shift[:, i])
        kept_dec = np.exp(d.topk_logprobs[:, 0].astype(np.float64) / t + d.topk_shift[:, i])
        np.testing.assert_allclose(kept_dec, kept_exact, rtol=1e-3)


def test_without_a_unit_temperature_the_top_log_prob_anchors_rows():
    rng = np.random.default_rng(3)
    s = CacheSettings(topk=8, vocab_size=300, temperatures=(2.0,), dtype="float16", encoding="compact")
    z = rng.normal(size=(6, 300)) * 2
    ids, lp, _, _ = teacher_rows(z, 8, (1.0,))
    _, _, shift, tail = teacher_rows(z, 8, (2.0,))
    mask = np.r_[np.zeros(3, bool), np.ones(6, bool)]
    r = normalize_record(CacheRecord(0, np.arange(9, dtype=np.int32), mask, 3, ids, lp, shift, tail), s)
    d = codec.decode_record(0, 3, codec.encode_record(r, s), s)
    assert s.dtype == "float32" and d.topk_logprobs.dtype == np.float32  # compact decodes to float32
    np.testing.assert_allclose(d.topk_logprobs[:, 0], lp[:, 0], atol=1e-2)
    assert (codec.row_kl(r, d, (2.0,)) <= BOUND).all()


def test_ids_up_to_the_largest_qwen2_id_survive_packing():
    vals = np.array([0, 1, 131071, 131072, 151935, 151934, 65535], dtype=np.int64)
    bits = codec.bits_per_vocab_id(151936)
    assert bits == 18
    np.testing.assert_array_equal(codec.unpack_bits(codec.pack_bits(vals, bits), bits, len(vals)), vals)
    rng = np.random.default_rng(0)
    for v in (vals, rng.integers(0, 151936, 1000), np.full(50, 151935)):  # fixed width and Rice paths
        buf = codec._encode_ints(v)
        out, pos = codec._decode_ints(np.frombuffer(buf, np.uint8), 0)
        assert pos == len(buf)
        np.testing.assert_array_equal(out, v)
    s = settings(151936, 3)
    r = normalize_record(exact_record(rng, 151936, 3, 4), s)
    r.topk_ids[:, 0] = 151935
    r.input_ids[:] = 151935
    d = codec.decode_record(0, r.assistant_start, codec.encode_record(r, s), s)
    assert (d.topk_ids[:, 0] == 151935).all() and (d.input_ids == 151935).all()


def test_integer_streams_round_trip_in_every_mode():
    """Fixed width, Rice and the frequency dictionary, each picked where it is smallest; the dictionary
    is never larger than the plain coder it competes with."""
    rng = np.random.default_rng(7)
    skewed = rng.choice(np.array([5, 151935, 70000, 3]), size=400, p=[0.7, 0.2, 0.05, 0.05])
    cases = {"empty": (np.zeros(0, np.int64), 0), "one": (np.array([151935]), None),
             "flat": (rng.integers(0, 2 ** 20, 300), 0), "small": (rng.geometric(0.3, 500) - 1, 1),
             "repeated ids": (skewed, 2), "one value": (np.full(64, 151935), 2),
             "largest": (np.array([2 ** 32 - 1, 0, 2 ** 32 - 1]), None)}
    for name, (v, mode) in cases.items():
        buf = codec._encode_ints(v, dictionary=True)
        assert len(buf) <= len(codec._encode_ints(v)), name
        out, pos = codec._decode_ints(np.frombuffer(buf, np.uint8), 0)
        assert pos == len(buf), name
        np.testing.assert_array_equal(out, v, err_msg=name)
        if mode is not None:
            assert buf[0] == mode, (name, buf[0])
    for x in (0, 1, 127, 128, 16383, 16384, 2 ** 32 - 1, 2 ** 40):
        b = codec._varint(x)
        assert codec._read_varint(np.frombuffer(b + b"\x07", np.uint8), 0) == (x, len(b))
    with pytest.raises(ValueError):
        codec._encode_ints(np.array([-1]))
    # corrupt headers fail with ValueError before allocating anything: a dictionary inside a dictionary,
    # a zero or oversized width, a count far beyond the bytes
    for bad in (bytes([2, 3, 2, 3]), bytes([0, 0x80, 0x80, 0x80, 0x01, 0]), bytes([0, 2, 40, 0]),
                bytes([1, 0xFF, 0xFF, 0xFF, 0x0F, 3, 0x10]), bytes([0, 0x80])):
        with pytest.raises(ValueError):
            codec._decode_ints(np.frombuffer(bad, np.uint8), 0)


def _read_bits_one_by_one(buf: bytes, bits: int, n: int) -> list[int]:
    """An independent reference for ``unpack_bits``: bit i of the stream is bit i % 8 of byte i // 8."""
    out = []
    for j in range(n):
        v = 0
        for b in range(bits):
            i = j * bits + b
            v |= ((buf[i // 8] >> (i % 8)) & 1) << b
        out.append(v)
    return out


def test_unpack_bits_reads_every_width_like_a_bit_by_bit_reader():
    rng = np.random.default_rng(5)
    for bits in range(1, 33):
        for n in (0, 1, 2, 7, 8, 9, 100):
            v = rng.integers(0, 1 << bits, n, dtype=np.int64)
            if n:
                v[0] = (1 << bits) - 1  # all ones, at the start of the stream
                v[-1] = (1 << bits) - 1  # and at its end: the 8-byte window must not read past it
            buf = codec.pack_bits(v, bits)
            assert len(buf) == (n * bits + 7) // 8
            assert _read_bits_one_by_one(buf, bits, n) == v.tolist()
            for src in (buf, np.frombuffer(buf + b"\xff" * 3, np.uint8)):  # bytes, or a longer array view
                out = codec.unpack_bits(src, bits, n)
                assert out.dtype == np.int64
                np.testing.assert_array_equal(out, v, err_msg=f"{bits} bits, {n} values")


def test_a_record_with_the_wrong_number_of_ids_is_refused():
    rng = np.random.default_rng(12)
    s = settings(1000, 8)
    r = normalize_record(exact_record(rng, 1000, 8, 6), s)
    blob = np.frombuffer(codec.encode_record(r, s), np.uint8)
    pos = 0
    for _ in range(3):  # the header's three counts
        _, pos = codec._read_varint(blob, pos)
    _, pos = codec._decode_ints(blob, pos)  # input ids
    pos += (len(r.input_ids) + 7) // 8  # the loss mask
    ids, end = codec._decode_ints(blob, pos)
    assert ids.size == 6 * 8
    bad = blob[:pos].tobytes() + codec._encode_ints(ids[:-1], dictionary=True) + blob[end:].tobytes()
    with pytest.raises(ValueError, match="47 ids"):
        codec.decode_record(0, r.assistant_start, bad, s)


def sampled_record(rng: np.random.Generator, V: int, n: int, draws: int, shared: int = 0) -> CacheRecord:
    """A top-1 record with ``draws`` Random-Sampling draws per row; ``shared`` ids drawn in most rows."""
    r = exact_record(rng, V, 1, n, samples=draws)
    if shared and n:  # move half the draws of every row onto a few ids common to the record
        common = rng.choice(V, size=shared, replace=False)
        offs, ids, cnts = [0], [], []
        for i in range(n):
            a, b = r.sample_offsets[i], r.sample_offsets[i + 1]
            pool = np.r_[np.repeat(r.sample_ids[a:b], r.sample_counts[a:b])[: draws // 2],
                         rng.choice(common, size=draws - draws // 2)]
            u, c = np.unique(pool, return_counts=True)
            ids.append(u)
            cnts.append(c)
            offs.append(offs[-1] + len(u))
        r.sample_offsets = np.array(offs, np.int64)
        r.sample_ids = np.concatenate(ids).astype(np.int32)
        r.sample_counts = np.concatenate(cnts).astype(np.int32)
    return r


@pytest.mark.parametrize("V,n,draws,shared", [(257, 0, 12, 0), (257, 1, 1, 0), (257, 9, 50, 3),
                                              (151936, 30, 50, 8), (151936, 12, 12, 0), (1025, 40, 50, 40)])
def test_sampled_ids_round_trip_with_shared_lists_and_implied_counts(V, n, draws, shared, monkeypatch):
    rng = np.random.default_rng(V + n + draws)
    s = settings(V, 1, samples=draws)
    r = normalize_record(sampled_record(rng, V, n, draws, shared), s)
    if n:  # the largest id survives, and a row whose top-1 id was not drawn
        r.sample_ids[r.sample_offsets[1] - 1] = V - 1  # row 0's last (largest) id
        r.topk_ids[0, 0] = min(set(range(V)) - set(r.sample_ids[:r.sample_offsets[1]].tolist()))
    blob = codec.encode_record(r, s)
    d = codec.decode_record(0, r.assistant_start, blob, s)
    check_decoded(r, d, s)
    if n:
        # counts that do not sum to the draws (another writer's record) are stored in full and still decode
        r2 = normalize_record(sampled_record(np.random.default_rng(1), V, n, draws, shared), s)
        r2.sample_counts[-1] += 1
        d2 = codec.decode_record(0, r2.assistant_start, codec.encode_record(r2, s), s)
        np.testing.assert_array_equal(d2.sample_counts, r2.sample_counts)
        np.testing.assert_array_equal(d2.sample_ids, r2.sample_ids)
    if shared >= 8:  # ids common to the record's rows are cheaper in their own list
        monkeypatch.setattr(codec, "_SHARE_THRESHOLDS", ())
        assert len(blob) < len(codec.encode_record(r, s))


def test_a_truncated_or_padded_record_is_refused():
    rng = np.random.default_rng(11)
    for kw in ({"samples": 12}, {"top_p": 0.9}, {}):
        s = settings(1000, 16, **kw)
        r = normalize_record(exact_record(rng, 1000, 16, 20, samples=kw.get("samples", 0)), s)
        blob = codec.encode_record(r, s)
        for cut in (1, 2, 5, len(blob) // 3, len(blob) // 2, len(blob) - 1):
            with pytest.raises(ValueError):
                codec.decode_record(0, r.assistant_start, blob[:cut], s)
        with pytest.raises(ValueError):
            codec.decode_record(0, r.assistant_start, blob + b"\x00", s)


def test_decoded_topk_tail_loss_equals_the_exact_one_within_the_bound():
    from student.losses import DistillTargets, kd_sum

    rng = np.random.default_rng(1)
    V, k, n = 600, 32, 40
    s = settings(V, k)
    r = normalize_record(exact_record(rng, V, k, n, scale=4.0), s)
    d = codec.decode_record(0, r.assistant_start, codec.encode_record(r, s), s)
    logits = torch.from_numpy(rng.normal(size=(n, V)) * 2).float()
    for i, t in enumerate(TEMPS):
        def loss(x: CacheRecord) -> float:
            tg = DistillTargets(labels=torch.zeros(n, dtype=torch.int64),
                                topk_ids=torch.from_numpy(x.topk_ids.astype(np.int64)),
                                topk_logprobs=torch.from_numpy(x.topk_logprobs.astype(np.float32)),
                                shift=torch.from_numpy(x.topk_shift[:, i].copy()),
                                tail=torch.from_numpy(x.tail_mass[:, i].copy()))
            return float(kd_sum(logits, tg, "topk_tail", t)) / n

        exact, decoded = loss(r), loss(d)
        # per row |CE difference| <= TV(p, q) * range(log q); TV <= sqrt(KL / 2) (Pinsker)
        kl = codec.row_kl(r, d, TEMPS)[:, i]
        assert abs(exact - decoded) <= np.sqrt(BOUND / 2) * 40, (exact, decoded)
        assert abs(exact - decoded) <= 1e-3 * abs(exact) + kl.mean() * 10, (exact, decoded)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_fused_loss_trains_on_adaptive_rows_as_the_reference_does(temperature):
    """Decoded adaptive-k rows repeat the top id with probability 0 in their unused slots: the fused
    chunked loss (what training runs) gives the reference ``topk_tail`` value and gradient on them."""
    from student.chunked_loss import chunked_distill_loss
    from student.losses import DistillTargets, distill_loss_sums

    rng = np.random.default_rng(6)
    V, k, n, d_model = 300, 16, 24, 8
    s = settings(V, k, top_p=0.8)
    r = normalize_record(exact_record(rng, V, k, n, scale=4.0), s)
    d = codec.decode_record(0, r.assistant_start, codec.encode_record(r, s), s)
    assert (d.topk_ids[:, 1:] == d.topk_ids[:, :1]).any()  # some rows are padded
    i = TEMPS.index(temperature)
    t = DistillTargets(labels=torch.from_numpy(rng.integers(0, V, n)),
                       topk_ids=torch.from_numpy(d.topk_ids.astype(np.int64)),
                       topk_logprobs=torch.from_numpy(d.topk_logprobs.copy()),
                       shift=torch.from_numpy(d.topk_shift[:, i].copy()),
                       tail=torch.from_numpy(d.tail_mass[:, i].copy()))
    hidden = torch.from_numpy(rng.normal(size=(n, d_model))).float()
    weight = torch.from_numpy(rng.normal(size=(V, d_model))).float()

    def run(fused: bool):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        sums = chunked_distill_loss(h, w, t, kind="topk_tail", temperature=temperature, chunk_size=7) \
            if fused else distill_loss_sums(h @ w.T, t, "topk_tail", temperature)
        gh, gw = torch.autograd.grad(0.3 * sums.ce + 0.7 * sums.kd, [h, w])
        return sums.kd, gh, gw

    (kd1, gh1, gw1), (kd0, gh0, gw0) = run(True), run(False)
    torch.testing.assert_close(kd1, kd0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-5)


def test_adaptive_k_accounts_for_every_dropped_id():
    rng = np.random.default_rng(2)
    V, k, n = 500, 64, 30
    r = exact_record(rng, V, k, n, scale=5.0)
    for p in (0.5, 0.9, 0.99, 1.0):
        kept, tail = codec.apply_top_p(r.topk_logprobs, r.topk_shift, r.tail_mass, TEMPS, p)
        csum = np.cumsum(np.exp(r.topk_logprobs.astype(np.float64)), axis=1)
        rows = np.arange(n)
        assert ((csum[rows, kept - 1] >= p * (1 - 1e-6)) | (kept == k)).all()  # reaches p ...
        assert (kept == 1).all() or (csum[rows, np.maximum(kept - 2, 0)][kept > 1] < p).all()  # ... fewest
        for i, t in enumerate(TEMPS):
            pt = np.exp(r.topk_logprobs.astype(np.float64) / t + r.topk_shift[:, i:i + 1])
            kept_mass = np.where(np.arange(k)[None] < kept[:, None], pt, 0.0).sum(1)
            np.testing.assert_allclose(kept_mass + tail[:, i], 1.0, atol=1e-6)


def compact_cache(path: Path, fmt: str, **kw) -> CacheSettings:
    rng = np.random.default_rng(5)
    s = CacheSettings(topk=8, vocab_size=300, temperatures=TEMPS, encoding="compact", format=fmt,
                      samples=6, **kw)
    with CacheWriter(path, {"t": 1}, s) as w:
        for u in range(2):
            w.write_unit(u, [exact_record(rng, 300, 8, 10, samples=6, seq_id=u * 3 + j) for j in range(3)])
        w.finalize(2)
    return s


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_verify_catches_a_flipped_byte_in_a_packed_shard(tmp_path, fmt):
    c = tmp_path / "c"
    compact_cache(c, fmt, top_p=0.9)
    assert verify_cache(c) == []
    m = json.loads((c / "manifest.json").read_text())
    fid = m["stats"]["fidelity"]
    assert fid["rows"] == 60 and max(fid["max_kl"]) <= BOUND and 1 <= fid["mean_kept_ids"] <= 8
    big = max(m["shards"][1]["files"], key=lambda f: f["bytes"])
    data = bytearray((c / big["path"]).read_bytes())
    data[len(data) // 2] ^= 0x10
    (c / big["path"]).write_bytes(bytes(data))
    defects = verify_cache(c)
    assert any("unit-000001" in d and "hash" in d for d in defects), defects


WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path[:0] = [{root!r}, {tests!r}]
    from test_cache_codec import exact_record, TEMPS
    from cache.schema import CacheSettings
    from cache.writer import CacheWriter
    s = CacheSettings(topk=8, vocab_size=300, temperatures=TEMPS, encoding="compact", top_p=0.9, samples=6)
    with CacheWriter(sys.argv[1], {{"t": 1}}, s) as w:
        done = w.done_units()
        for u in range(4):
            rng = np.random.default_rng(100 + u)
            recs = [exact_record(rng, 300, 8, 10, samples=6, seq_id=u * 3 + j) for j in range(3)]
            if u not in done:
                w.write_unit(u, recs)
                time.sleep(float(sys.argv[2]))
        w.finalize(4)
""")


def test_resume_after_kill_9_with_compact_encoding_gives_identical_content(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(root), tests=str(root / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    subprocess.run([sys.executable, str(script), str(ref), "0"], check=True, env=env, timeout=120)
    proc = subprocess.Popen([sys.executable, str(script), str(crash), "30"], env=env)
    journal = crash / "journal.rank0.jsonl"
    deadline = time.time() + 90
    try:
        while time.time() < deadline and proc.poll() is None:
            if journal.exists() and '"type":"unit"' in journal.read_text():
                break
            time.sleep(0.02)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (crash / "manifest.json").exists()
    subprocess.run([sys.executable, str(script), str(crash), "0"], check=True, env=env, timeout=120)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (ref, crash))
    assert [s["hash"] for s in ma["shards"]] == [s["hash"] for s in mb["shards"]]
    ra, rb = open_cache(ref, verify_hashes="all"), open_cache(crash, verify_hashes="all")
    for i in range(len(ra)):
        x, y = ra[i], rb[i]
        for f in ("input_ids", "topk_ids", "topk_logprobs", "topk_shift", "tail_mass", "sample_ids"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert verify_cache(crash) == []
