"""cache.writer, cache.reader and cache.verify on real files: round trips, corruption, resume, locks,
ranks, verify and the CLI."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import random_samples  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.schema import (
    FORMAT_VERSION,
    CacheError,
    CacheRecord,
    CacheSettings,
    FingerprintMismatch,
    normalize_record,
)
from cache.util import UserError
from cache.verify import verify_cache
from cache.writer import CacheWriter

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
        rec.update(random_samples(rng, n, VOCAB, s.samples))
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


SMALL = dict(topk=4, vocab_size=VOCAB, temperatures=(1.0, 2.0))


def shard_files(path: Path, unit: int) -> list[Path]:
    m = json.loads((path / "manifest.json").read_text())
    return [path / f["path"] for f in m["shards"][unit]["files"]]


def chunk_file(path: Path, unit: int) -> Path:
    """The Arrow shard, or a topk_logprobs chunk of a Zarr shard."""
    files = shard_files(path, unit)
    return next((f for f in files if "/topk_logprobs/c/" in f.as_posix()), files[0])


def flip_byte(p: Path, where: float = 0.6) -> None:
    b = bytearray(p.read_bytes())
    b[int(len(b) * where)] ^= 0x40
    p.write_bytes(bytes(b))


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_flipped_truncated_deleted_shard_detected(tmp_path, fmt):
    s = CacheSettings(**SMALL, format=fmt)
    units = make_units(s)
    src = tmp_path / "good"
    write_cache(src, s, units)
    for damage in ("flip", "truncate", "delete"):
        c = tmp_path / damage
        shutil.copytree(src, c)
        target = chunk_file(c, 1)
        if damage == "flip":
            flip_byte(target)
        elif damage == "truncate":
            target.write_bytes(target.read_bytes()[:-3])
        else:
            target.unlink()
        unit_name = f"unit-000001.{fmt}"
        defects = verify_cache(c)
        assert defects and all(unit_name in d for d in defects), defects
        if damage == "flip":
            r = open_cache(c)
            assert_same(r[0], units[0][0])
            with pytest.raises(CacheError, match=unit_name):
                r[5]
            with pytest.raises(CacheError, match=unit_name):
                open_cache(c, verify_hashes="all")
            if fmt == "zarr":  # with no hash check, the crc32c codec still refuses the chunk
                with pytest.raises(CacheError, match=unit_name):
                    open_cache(c, verify_hashes="none")[5]
        else:
            with pytest.raises(CacheError, match=unit_name):
                open_cache(c)


def test_zarr_missing_chunk_never_reads_as_zeros(tmp_path):
    s = CacheSettings(**SMALL, format="zarr", samples=4, zarr_chunk_rows=8)
    units = make_units(s)
    c = tmp_path / "c"
    write_cache(c, s, units)
    r = open_cache(c, verify_hashes="none")
    assert_same(r[7], units[1][2])
    rows_before = sum(int(x.loss_mask.sum()) for x in units[1][:2])
    chunk = c / f"unit-000001.zarr/tail_mass/c/{rows_before // 8}/0"
    assert chunk.exists()
    chunk.unlink()
    with pytest.raises(CacheError, match="unit-000001.zarr"):
        r[7]
    r2 = pickle.loads(pickle.dumps(r))
    with pytest.raises(CacheError, match="missing"):
        r2[7]


def test_unfinished_and_other_version_refused(tmp_path):
    s = CacheSettings(**SMALL)
    c = tmp_path / "c"
    with CacheWriter(c, FP, s) as w:
        w.write_unit(0, make_units(s, 1)[0])
    with pytest.raises(CacheError, match="not a finished cache; rerun the same teacher-cache command"):
        open_cache(c)
    with CacheWriter(c, FP, s) as w:
        w.finalize(1)
    m = json.loads((c / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="format_version"):
        open_cache(c)
    assert "format_version" in verify_cache(c)[0]


def test_fingerprint_mismatch_refused(tmp_path):
    s = CacheSettings(**SMALL)
    c = tmp_path / "c"
    with CacheWriter(c, FP, s) as w:
        w.write_unit(0, make_units(s, 1)[0])
    with pytest.raises(CacheError, match=r"differs: max_length.*another --out or delete"):
        CacheWriter(c, {**FP, "max_length": 128}, s)
    with pytest.raises(CacheError, match=r"settings\.topk"):
        CacheWriter(c, FP, CacheSettings(**{**SMALL, "topk": 8}))
    with CacheWriter(c, FP, s) as w:
        w.finalize(1)
    (c / "journal.rank0.jsonl").unlink()
    with pytest.raises(FingerprintMismatch, match=r"manifest\.json was made with a different fingerprint"):
        CacheWriter(c, {**FP, "teacher": "other"}, s)


def test_second_writer_refused(tmp_path):
    s = CacheSettings(**SMALL)
    with CacheWriter(tmp_path, FP, s):
        msg = f"another teacher-cache process is writing to {tmp_path} \\(rank 0\\)"
        with pytest.raises(CacheError, match=msg):
            CacheWriter(tmp_path, FP, s)
        CacheWriter(tmp_path, FP, s, rank=1, world_size=2).close()
    CacheWriter(tmp_path, FP, s).close()


def shards_and_records(c: Path) -> tuple[list, list]:
    m = json.loads((c / "manifest.json").read_text())
    r = open_cache(c, verify_hashes="all")
    return [(s["unit"], s["hash"], s["bytes"]) for s in m["shards"]], [r[i] for i in range(len(r))]


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_resume_after_crash_equals_uninterrupted(tmp_path, fmt):
    s = CacheSettings(**SMALL, samples=3, format=fmt)
    units = make_units(s, num_units=4)
    ref = tmp_path / "ref"
    write_cache(ref, s, units)
    c = tmp_path / "crash"
    with CacheWriter(c, FP, s) as w:
        w.write_unit(0, units[0])
        w.write_unit(1, units[1])
        e2 = w.write_unit(2, units[2])
        w.write_unit(3, units[3])
    # unit 2: renamed, then the crash tore its journal line; unit 3: written, never journalled;
    # plus a temporary file of a unit being written.
    j = c / "journal.rank0.jsonl"
    lines = j.read_bytes().splitlines(keepends=True)
    torn = json.dumps(e2, separators=(",", ":")).encode()[:40]
    j.write_bytes(b"".join(lines[:3]) + torn)
    (c / f".tmp-r0-unit-000004.{fmt}").write_bytes(b"partial")
    (c / ".index.npz.x1y2.tmp").write_bytes(b"partial")
    with CacheWriter(c, FP, s) as w:
        assert w.done_units() == {0, 1}
        assert not (c / f".tmp-r0-unit-000004.{fmt}").exists() and not (c / ".index.npz.x1y2.tmp").exists()
        assert not (c / f"unit-000002.{fmt}").exists() and not (c / f"unit-000003.{fmt}").exists()
        for u in sorted(set(range(4)) - w.done_units()):
            w.write_unit(u, units[u])
        w.finalize(4)
    assert j.read_bytes().endswith(b"\n")
    (sa, ra), (sb, rb) = shards_and_records(ref), shards_and_records(c)
    assert sa == sb
    for a, b in zip(ra, rb):
        assert_same(a, b)
    assert verify_cache(c) == []


def test_two_ranks_equal_one_rank(tmp_path):
    s = CacheSettings(**SMALL, samples=2)
    units = make_units(s, num_units=5)
    one = tmp_path / "one"
    write_cache(one, s, units)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"fake": true}')
    two = tmp_path / "two"
    w0, w1 = CacheWriter(two, FP, s, rank=0, world_size=2), CacheWriter(two, FP, s, rank=1, world_size=2)
    for u in range(5):
        (w0 if u % 2 == 0 else w1).write_unit(u, units[u])
    with pytest.raises(CacheError, match="finalize runs on rank 0"):
        w1.finalize(5)
    assert w0.done_units() == w1.done_units() == set(range(5))
    with pytest.raises(CacheError, match=r"1 of 6 units.*units 5\)"):
        w0.finalize(6)
    w0.finalize(5, attachments={"tokenizer": tok}, tokenizer={"vocab_size": 900})
    w0.close()
    w1.close()
    assert shards_and_records(one)[0] == shards_and_records(two)[0]
    for a, b in zip(shards_and_records(one)[1], shards_and_records(two)[1]):
        assert_same(a, b)
    r = open_cache(two)
    assert (r.tokenizer_dir / "tokenizer.json").read_text() == '{"fake": true}'
    assert r.manifest["tokenizer"] == {"vocab_size": 900}
    (r.tokenizer_dir / "tokenizer.json").write_text('{"fake": false}')
    assert any("attachment tokenizer" in d for d in verify_cache(two))


def test_verify_finds_bad_values(tmp_path):
    s = CacheSettings(**SMALL, samples=4)
    units = make_units(s, num_units=2)
    bad = units[1][0]
    bad.topk_logprobs[0, 0] = 0.5
    bad.tail_mass[0, 1] = 1.5
    bad.topk_ids[0, 0] = VOCAB
    bad.sample_counts[0] += 1
    units[1][1].topk_shift[0, 0] = np.nan
    units[1][2].topk_logprobs[0, :2] = [-3.0, -1.0]
    c = tmp_path / "c"
    write_cache(c, s, units)
    text = "\n".join(verify_cache(c))
    for needle in ("> 0", "tail_mass", "topk_ids outside", "sum to samples=4", "topk_shift not finite",
                   "sorted descending"):
        assert needle in text, needle
    assert "unit-000000" not in text


def test_settings_validated():
    for bad in (dict(topk=0), dict(samples=-1), dict(temperatures=(1.0, 1.0)), dict(temperatures=(0.0,)),
                dict(dtype="bfloat16"), dict(format="parquet"), dict(topk=VOCAB + 1)):
        with pytest.raises(UserError):
            CacheSettings(**{**SMALL, **bad})
    r = CacheSettings(**SMALL)
    rec = make_units(r, 1, 1)[0][0]
    rec.topk_ids = rec.topk_ids[:, :2]
    with pytest.raises(ValueError, match="topk_ids has shape"):
        normalize_record(rec, r)


def _read_in_worker(args):
    reader, i = args
    rec = reader[i]
    return rec.seq_id, rec.input_ids.tolist()


def test_reader_in_spawned_worker(tmp_path):
    import multiprocessing as mp

    s = CacheSettings(**SMALL)
    units = make_units(s)
    write_cache(tmp_path / "c", s, units)
    r = open_cache(tmp_path / "c")
    r[0]
    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.map(_read_in_worker, [(r, 3), (r, 12)])
    assert got == [(3, units[0][3].input_ids.tolist()), (12, units[2][2].input_ids.tolist())]


def test_cli_info_and_verify(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    s = CacheSettings(**SMALL)
    c = tmp_path / "c"
    write_cache(c, s, make_units(s), fp={**FP, "teacher": "Qwen/Qwen2-0.5B-Instruct"})
    runner = CliRunner()
    out = runner.invoke(app, ["cache", "verify", str(c)])
    assert out.exit_code == 0 and out.stdout.startswith("OK"), out.output
    out = runner.invoke(app, ["cache", "info", str(c), "--json"])
    info = json.loads(out.stdout)
    assert info["sequences"] == 15 and info["teacher"] == "Qwen/Qwen2-0.5B-Instruct" and info["topk"] == 4
    out = runner.invoke(app, ["cache", "info", str(c)])
    assert "supervised tokens" in out.stdout and info["fingerprint_digest"] in out.stdout
    flip_byte(chunk_file(c, 2))
    out = runner.invoke(app, ["cache", "verify", str(c)])
    assert out.exit_code == 1 and "unit-000002.arrow" in out.stdout
    for cmd in ("info", "verify"):
        assert runner.invoke(app, ["cache", cmd, "--help"]).exit_code == 0


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
def test_empty_unit_and_rewritten_unit(tmp_path, fmt):
    s = CacheSettings(**SMALL, samples=2, format=fmt)
    units = make_units(s, num_units=3)
    c = tmp_path / "c"
    with CacheWriter(c, FP, s) as w:
        w.write_unit(0, units[0])
        w.write_unit(1, [])
        w.write_unit(2, units[1])
        w.write_unit(2, units[2])  # rewritten: the newest journal entry describes the file
        u0 = c / f"unit-000000.{fmt}"
        flip_byte(next(p for p in u0.rglob("*") if "topk_ids/c/0/" in p.as_posix()) if fmt == "zarr" else u0)
        with pytest.raises(CacheError, match=f"unit-000000.{fmt} does not match its journalled hash"):
            w.finalize(3)
        w.write_unit(0, units[0])
        w.finalize(3)
    r = open_cache(c)
    assert len(r) == 10 and list(r.num_supervised[5:]) == [int(x.loss_mask.sum()) for x in units[2]]
    for a, b in zip(r, units[0] + units[2]):
        assert_same(a, b)
    assert verify_cache(c) == []


def test_journal_torn_line_of_other_rank_skipped_corrupt_middle_line_refused(tmp_path):
    s = CacheSettings(**SMALL)
    units = make_units(s, num_units=2)
    with CacheWriter(tmp_path, FP, s, rank=1, world_size=2) as w1:
        w1.write_unit(1, units[1])
    j1 = tmp_path / "journal.rank1.jsonl"
    intact = j1.read_bytes()
    j1.write_bytes(intact + b'{"type":"unit","unit":3,"fi')
    with CacheWriter(tmp_path, FP, s, rank=0, world_size=2) as w0:
        assert w0.done_units() == {1}
        assert j1.read_bytes().endswith(b'"fi')  # another rank's journal is never edited
        w0.write_unit(0, units[0])
        w0.finalize(2)
    assert len(open_cache(tmp_path)) == 10
    lines = intact.splitlines(keepends=True)
    j1.write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]))
    with pytest.raises(CacheError, match=r"journal\.rank1\.jsonl line 2 is corrupt"):
        CacheWriter(tmp_path, FP, s, rank=0, world_size=2)


def _rehash(m: dict) -> None:
    from cache.util import json_hash

    m["manifest_hash"] = json_hash({k: v for k, v in m.items() if k != "manifest_hash"})


@pytest.mark.parametrize("edit,rehash,needle", [
    ("temperatures", False, "content hash"),
    ("temperatures", True, "temperatures=[1.0, 3.0] but its settings say [1.0, 2.0]"),
    ("settings_temperatures", True, "settings that differ from those in journal.rank0.jsonl"),
    ("pad_token_id", False, "content hash"),
    ("fingerprint", False, "content hash"),
    ("fingerprint", True, "fingerprint that does not match its fingerprint_digest"),
    ("fingerprint_and_digest", True, "fingerprint that differs from the one in journal.rank0.jsonl"),
])
def test_manifest_edits_are_refused_by_reader_and_verify(tmp_path, edit, rehash, needle):
    from cache.util import json_hash

    s = CacheSettings(**SMALL)
    c = tmp_path / "c"
    with CacheWriter(c, FP, s) as w:
        w.write_unit(0, make_units(s, 1)[0])
        w.finalize(1, tokenizer={"vocab_size": 900, "pad_token_id": 3})
    assert verify_cache(c) == []
    m = json.loads((c / "manifest.json").read_text())
    if edit == "temperatures":
        m["temperatures"] = [1.0, 3.0]
    elif edit == "settings_temperatures":
        m["temperatures"] = m["settings"]["temperatures"] = [1.0, 3.0]
    elif edit == "pad_token_id":
        m["tokenizer"]["pad_token_id"] = 4
    else:
        m["fingerprint"]["max_length"] = 128
        if edit == "fingerprint_and_digest":
            m["fingerprint_digest"] = json_hash(m["fingerprint"])
    if rehash:
        _rehash(m)
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="edited or damaged") as e:
        open_cache(c)
    assert needle in str(e.value) and "\n" not in str(e.value)
    defects = verify_cache(c)
    assert len(defects) == 1 and needle in defects[0]


def test_manifest_listing_a_shard_no_journal_recorded_is_refused(tmp_path):
    s = CacheSettings(**SMALL)
    c = tmp_path / "c"
    write_cache(c, s, make_units(s, 2))
    m = json.loads((c / "manifest.json").read_text())
    m["shards"][1]["hash"] = m["shards"][0]["hash"]
    _rehash(m)
    (c / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheError, match="lists shard unit-000001.arrow with a hash no journal recorded"):
        open_cache(c)


def test_verify_attachments_at_open(tmp_path):
    s = CacheSettings(**SMALL)
    c, tok = tmp_path / "c", tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"fake": true}')
    with CacheWriter(c, FP, s) as w:
        w.write_unit(0, make_units(s, 1)[0])
        w.finalize(1, attachments={"tokenizer": tok})
    open_cache(c, verify_attachments=True)
    data = bytearray((c / "tokenizer" / "tokenizer.json").read_bytes())
    data[3] ^= 1
    (c / "tokenizer" / "tokenizer.json").write_bytes(bytes(data))
    open_cache(c)  # the attachment is checked only when asked (verify does it too)
    with pytest.raises(CacheError, match=r"attachment tokenizer is damaged: tokenizer/tokenizer.json "
                                         r"does not match its recorded hash"):
        open_cache(c, verify_attachments=True)
    shutil.rmtree(c / "tokenizer")
    with pytest.raises(CacheError, match="tokenizer/tokenizer.json is missing"):
        open_cache(c).verify_attachments()
