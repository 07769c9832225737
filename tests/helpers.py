"""Shared test helpers: synthetic caches written by the real CacheWriter from a known bigram teacher
(used by tests/test_train.py and tests/test_train_ddp.py; tests/ is on sys.path under pytest)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cache.schema import CacheRecord, CacheSettings
from cache.writer import CacheWriter

V = 40  # teacher and tokenizer vocabulary of the synthetic caches
EOS, PAD = 38, 39


def bigram_logits(seed: int = 0, scale: float = 2.5) -> np.ndarray:
    """The known teacher: next-token logits depend on the previous token only. (V, V)"""
    return np.random.default_rng(seed).normal(size=(V, V)) * scale


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def teacher_rows(z: np.ndarray, k: int, temps: tuple[float, ...]) -> tuple:
    """Top-k ids/log-probs at T=1, shifts and exact tails per temperature, for logits z (n, V), in float64."""
    lp1 = log_softmax(z)
    ids = np.argsort(-lp1, axis=1, kind="stable")[:, :k]
    shift = np.stack([np.log(np.exp(z).sum(-1)) / T - np.log(np.exp(z / T).sum(-1)) for T in temps], 1)
    tail = np.stack([1.0 - np.take_along_axis(np.exp(log_softmax(z / T)), ids, 1).sum(1) for T in temps], 1)
    return ids, np.take_along_axis(lp1, ids, 1), shift, np.clip(tail, 0.0, 1.0)


def write_bigram_cache(path: Path, n: int = 24, *, seed: int = 0, teacher_seed: int = 0, k: int = 8,
                       temps: tuple[float, ...] = (1.0, 2.0), samples: int = 0, lengths=(10, 20),
                       equal_length: int | None = None, tokenizer_hash: str = "bigram-tok",
                       attachments: dict[str, Path] | None = None, **settings_kw) -> Path:
    """Sequences drawn from the bigram teacher (prompt of 3-5 tokens, then the answer, ending with EOS);
    teacher rows are its exact distributions. Written with the real CacheWriter in 2 units."""
    rng = np.random.default_rng(seed)
    M = bigram_logits(teacher_seed)
    recs = []
    for i in range(n):
        L = equal_length or int(rng.integers(*lengths))
        start = int(rng.integers(3, 6))
        ids = [int(rng.integers(0, EOS))]
        for _ in range(L - 2):
            p = np.exp(log_softmax(M[ids[-1]]))
            ids.append(int(rng.choice(V, p=p)))
        ids.append(EOS)
        ids = np.array(ids, dtype=np.int32)
        mask = np.zeros(L, dtype=bool)
        mask[start:] = True
        t = np.flatnonzero(mask)
        z = M[ids[t - 1]]  # (n, V): the teacher at position t - 1
        tk, lp, shift, tail = teacher_rows(z, k, temps)
        rec = dict(seq_id=i, input_ids=ids, loss_mask=mask, assistant_start=start,
                   topk_ids=tk.astype(np.int32), topk_logprobs=lp.astype(np.float32),
                   topk_shift=shift.astype(np.float32), tail_mass=tail.astype(np.float32))
        if samples:
            rec.update(teacher_samples(rng, z, samples))
        recs.append(CacheRecord(**rec))
    settings = CacheSettings(**{"topk": k, "vocab_size": V, "samples": samples, "temperatures": temps,
                                "dtype": "float32", **settings_kw})
    fp = {"teacher": f"bigram-{teacher_seed}", "tokenizer_hash": tokenizer_hash, "data_seed": seed, "n": n,
          "equal": equal_length, "samples": samples, "temps": list(temps)}
    half = (n + 1) // 2
    with CacheWriter(path, fingerprint=fp, settings=settings) as w:
        w.write_unit(0, recs[:half])
        w.write_unit(1, recs[half:])
        w.finalize(2, attachments=attachments, tokenizer={"vocab_size": V, "eos_token_id": EOS,
                                                          "pad_token_id": PAD, "hash": tokenizer_hash})
    return path


def teacher_samples(rng: np.random.Generator, z: np.ndarray, samples: int) -> dict[str, np.ndarray]:
    """Random-Sampling KD fields drawn from the teacher: ``samples`` draws per row of logits ``z`` (n, V),
    kept as unique ids + counts (rows in order, so a seeded ``rng`` gives the same draws every time)."""
    offs, ids, cnts = [0], [], []
    for row in z:
        u, c = np.unique(rng.choice(z.shape[1], size=samples, p=np.exp(log_softmax(row))), return_counts=True)
        ids.append(u)
        cnts.append(c)
        offs.append(offs[-1] + len(u))
    return dict(sample_offsets=np.array(offs, np.int64),
                sample_ids=np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32),
                sample_counts=np.concatenate(cnts).astype(np.int32) if cnts else np.zeros(0, np.int32))


def random_samples(rng: np.random.Generator, n: int, vocab: int, samples: int) -> dict[str, np.ndarray]:
    """Random-Sampling KD fields for ``n`` rows: ``samples`` uniform draws per row as unique ids + counts."""
    offs, ids, cnts = [0], [], []
    for _ in range(n):
        u, c = np.unique(rng.integers(0, vocab, samples), return_counts=True)
        ids.append(u)
        cnts.append(c)
        offs.append(offs[-1] + len(u))
    return dict(sample_offsets=np.array(offs, np.int64), sample_ids=np.concatenate(ids).astype(np.int32),
                sample_counts=np.concatenate(cnts).astype(np.int32))


def kill_9_when(cmd: list[str], ready: Callable[[], bool], *, env: dict[str, str] | None = None,
                timeout: float = 120.0, poll: float = 0.01) -> subprocess.Popen:
    """Start ``cmd``, wait until ``ready()`` (polled every ``poll`` s), then kill -9 it. Fails when the
    process ends first; returns the reaped process (its returncode is -SIGKILL)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(poll)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return proc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(args: list[str], *, env: dict[str, str], timeout: float = 300.0) -> list[tuple]:
    """Run ``torchrun --nnodes 2 --nproc-per-node 1`` as two agents on this machine, as on two machines: each
    its own process with ``--node-rank``, meeting at a c10d rendezvous on 127.0.0.1 (a free port, one id).
    ``args`` follow torchrun's own (``-m pipeline ...`` or a script). Returns (returncode, stderr) per
    node."""
    endpoint, job = f"127.0.0.1:{free_port()}", f"test-{os.getpid()}-{time.time_ns()}"
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", job,
               # node 0 hosts the rendezvous store, as the machine named in the endpoint would; left to guess,
               # both agents see 127.0.0.1 as their own address and race to host it
               "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", *args]
        err = tempfile.TemporaryFile()
        procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err), err))
    results = []
    try:
        for proc, err in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.seek(0)
            results.append((proc.returncode, err.read().decode(errors="replace")))
            err.close()
    return results
