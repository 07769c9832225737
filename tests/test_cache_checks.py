"""What training's cache open checks beyond the hashes, as ``cache verify`` does: shards in unit order (a
manifest with swapped shard entries and a recomputed hash is refused at open), the index against the
manifest (at open) and every record against its index row (when read); ``cache verify`` on a folder that is
not there; the compact decoder's header counts bounded by the record's size before any allocation (under an
address-space limit in a child process)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_bigram_cache  # tests/ is on sys.path under pytest

from cache.manifest import manifest_hash
from cache.reader import open_cache
from cache.schema import CacheError
from cache.util import UserError, atomic_write_json, file_hash
from cache.verify import verify_cache
from student.train import TrainConfig, setup

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=16, layers=1, ffn=32, window=4, max_positions=64, steps=1, batch_tokens=96,
            warmup=0, eval_every=0, save_every=0, num_workers=0, progress=False, chunk_size=64)


def rewrite_manifest(cache: Path, edit) -> None:
    """Edit the manifest and recompute its own content hash, as a careful forger (or a buggy tool) would."""
    m = json.loads((cache / "manifest.json").read_text())
    edit(m)
    m["manifest_hash"] = manifest_hash(m)
    atomic_write_json(cache / "manifest.json", m)


def test_swapped_shard_entries_are_refused_at_open_by_training_and_by_verify(tmp_path):
    cache = write_bigram_cache(tmp_path / "c", n=8)

    def swap(m):
        m["shards"][0], m["shards"][1] = m["shards"][1], m["shards"][0]

    rewrite_manifest(cache, swap)
    order = r"lists shard unit-000001\.arrow \(unit 1\) at position 0: shards must be units 0\.\.1 in order"
    with pytest.raises(CacheError, match=order):
        open_cache(cache, verify_hashes="all")
    with pytest.raises(UserError, match="shards must be units 0..1 in order"):
        setup(TrainConfig(cache=cache, out=tmp_path / "out", **TINY))
    assert not (tmp_path / "out").exists()
    assert any("in order" in d for d in verify_cache(cache))


def test_index_disagreeing_with_the_records_is_refused_when_read(tmp_path):
    cache = write_bigram_cache(tmp_path / "c", n=8, lengths=(10, 30))
    with np.load(cache / "index.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    i, j = 0, 1 + int(np.flatnonzero(arrays["length"][1:4] != arrays["length"][0])[0])  # one shard
    for k in ("length", "num_supervised"):  # same totals per shard: only the records can tell
        arrays[k][[i, j]] = arrays[k][[j, i]]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (cache / "index.npz").write_bytes(buf.getvalue())

    def rehash(m):
        m["index"].update(bytes=len(buf.getvalue()), hash=file_hash(cache / "index.npz"))

    rewrite_manifest(cache, rehash)
    reader = open_cache(cache, verify_hashes="all")  # consistent with the manifest: opens
    with pytest.raises(CacheError, match=rf"record {i} \(seq_id 0\) disagrees with the index"):
        reader[i]
    assert any("disagree with the index" in d for d in verify_cache(cache))

    def skew(m):  # an index whose per-shard sums disagree with the shard list is refused at open
        m["shards"][0]["num_tokens"] += 1
        m["shards"][1]["num_tokens"] -= 1

    rewrite_manifest(cache, skew)
    with pytest.raises(CacheError, match="the index disagrees with the manifest"):
        open_cache(cache, verify_hashes="none")


def test_verify_on_a_missing_folder_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "cache", "verify", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == "", proc
    want = f"error: {tmp_path / 'nope'} does not exist; pass the folder teacher-cache wrote (its --out)"
    assert proc.stderr.strip() == want


# Decodes forged records under an address-space limit of what the process uses plus 256 MiB: a header
# count of 2**31 must be refused before the decoder allocates for it (gigabytes).
FORGED = r"""
import resource, sys
import numpy as np
from cache.codec import _read_varint, _varint, decode_record, encode_record
from cache.schema import CacheRecord, CacheSettings
rng = np.random.default_rng(0)
for top_p in (None, 0.9):
    s = CacheSettings(topk=8, vocab_size=40, temperatures=(1.0, 2.0), dtype="float32", encoding="compact",
                      top_p=top_p)
    L, n = 12, 8
    lp = np.sort(np.log(rng.dirichlet(np.ones(9))[:8]))[::-1][None].repeat(n, 0).astype(np.float32)
    rec = CacheRecord(seq_id=0, input_ids=rng.integers(0, 40, L).astype(np.int32),
                      loss_mask=np.arange(L) >= L - n, assistant_start=L - n,
                      topk_ids=np.argsort(rng.random((n, 40)), 1)[:, :8].astype(np.int32), topk_logprobs=lp,
                      topk_shift=np.zeros((n, 2), np.float32), tail_mass=np.full((n, 2), 0.1, np.float32))
    blob = encode_record(rec, s)
    buf = np.frombuffer(blob, np.uint8)
    L0, p = _read_varint(buf, 0)
    n0, p = _read_varint(buf, p)
    m0, p = _read_varint(buf, p)
    rest = blob[p:]
    decode_record(0, L - n, blob, s)  # the genuine record decodes
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
    for header in ((2**31, n0, m0), (L0, 2**31, m0), (2**31, 2**31, m0), (L0, n0, 2**31)):
        forged = b"".join(_varint(x) for x in header) + rest
        try:
            decode_record(0, L - n, forged, s)
            print("DECODED", header)
        except ValueError as e:
            print("REFUSED", e)
"""


def test_forged_header_counts_are_refused_before_any_allocation():
    proc = subprocess.run([sys.executable, "-c", FORGED], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 8 and all(ln.startswith("REFUSED compact record header claims") for ln in lines), \
        proc.stdout
