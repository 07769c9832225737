"""DDP: two gloo processes under torch.distributed.run take the same optimizer steps as one process that
accumulates the same global batch (the same micro-batches, split across ranks by the sampler)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import V, torchrun_two_nodes, write_bigram_cache  # tests/ is on sys.path under pytest

import student.train as train
from student.train import FINAL, METRICS, TrainConfig, train_student

pytestmark = pytest.mark.usefixtures("one_thread")

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import student.train as train

    out = sys.argv[2]
    original = train.optimizer_step

    def record_first_gradient(run):
        if run.state.step == 0:
            grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
            torch.save(grads, os.path.join(out, f"grads-rank{run.dist.rank}.pt"))
        return original(run)

    train.optimizer_step = record_first_gradient
    train.train_student(train.TrainConfig(**json.loads(sys.argv[1])))
''')


def config(cache, out, **kw) -> dict:
    base = dict(cache=str(cache), out=str(out), hidden_size=16, layers=2, ffn=32, window=4, max_positions=64,
                dropout=0.0, steps=3, batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=2,
                save_every=0, log_every=1, num_workers=0, progress=False, chunk_size=64, val_fraction=0.25,
                compact_vocab=True)
    return {**base, **kw}


def losses(out) -> list[tuple]:
    rows = [json.loads(ln) for ln in (out / METRICS).read_text().splitlines() if ln.strip()]
    return [(r["event"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_ce"), r.get("val_kl"),
             r.get("supervised_tokens")) for r in rows]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process accumulating the global batch (2 micro-batches per step), with its first
    gradient recorded."""
    tmp = tmp_path_factory.mktemp("one")
    cache = write_bigram_cache(tmp / "cache", n=20)
    out = tmp / "one"
    out.mkdir()
    first: dict[str, torch.Tensor] = {}
    original = train.optimizer_step

    def record(run):
        if run.state.step == 0:
            first.update({n: p.grad.clone() for n, p in run.model.named_parameters()})
        return original(run)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "optimizer_step", record)
        train_student(TrainConfig(**config(cache, out, accum=2)))
    return cache, out, first


def worker_args(tmp_path, cache) -> tuple[list[str], dict[str, str], object]:
    """The worker script and its arguments for torchrun (each rank runs it), its environment, its --out."""
    two = tmp_path / "two"
    two.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(tests_dir), os.environ.get("PYTHONPATH", "")])}
    return [str(script), json.dumps(config(cache, two, accum=1)), str(two)], env, two


def assert_same_run(one_process, two) -> None:
    """Two ranks, one micro-batch each per step, took the one-process run's steps."""
    _, one, first = one_process
    g0, g1 = (torch.load(two / f"grads-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first.keys() == g0.keys()
    for name in first:  # after the all-reduce every rank holds the one-process gradient
        torch.testing.assert_close(g0[name], first[name], rtol=1e-5, atol=1e-8, msg=name)
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=0, msg=name)
    assert any(first[n].abs().sum() > 0 for n in first if "causal_stft.projection.weight" in n)

    a, b = losses(one), losses(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] and {"train", "eval"} == {x[0] for x in a}
    for x, y in zip(a, b):
        assert x[6] == y[6]
        np.testing.assert_allclose(np.array(x[2:6], dtype=float), np.array(y[2:6], dtype=float), rtol=1e-4)

    from safetensors.torch import load_file

    pa = load_file(str(one / FINAL / "model.safetensors"))
    pb = load_file(str(two / FINAL / "model.safetensors"))
    for name in pa:  # Adam's first steps divide by |g|: near-zero entries may move by up to ~lr per step
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=2e-3, msg=name)
    assert json.loads((two / FINAL / "provenance.json").read_text())["world_size"] == 2
    assert json.loads((two / FINAL / "config.json").read_text())["full_vocab_size"] == V


def test_two_gloo_ranks_equal_one_process(one_process, tmp_path):
    args, env, two = worker_args(tmp_path, one_process[0])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert_same_run(one_process, two)


@pytest.mark.slow
def test_two_nodes_equal_one_process(one_process, tmp_path):
    """Two torchrun agents (two "machines", one process each) meeting at a c10d rendezvous on 127.0.0.1."""
    args, env, two = worker_args(tmp_path, one_process[0])
    for rc, err in torchrun_two_nodes(args, env=env):
        assert rc == 0, err[-3000:]
    assert_same_run(one_process, two)


@pytest.mark.parametrize("world", [2, 3])
def test_step_tokens_give_every_rank_the_same_number_of_micro_batches(tmp_path, world):
    cfg = TrainConfig(**{**config(tmp_path, tmp_path), "step_tokens": 500, "batch_tokens": 96})
    m = train.micro_batches_per_step(cfg, world)
    assert m % world == 0 and m * 96 >= 500 and (m - world) * 96 < 500
