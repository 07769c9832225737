"""The training loop (student.train) on caches written by the real CacheWriter from a known bigram teacher,
and one end-to-end run of the real CLI on a cache that pipeline.teacher_cache makes with the tiny Qwen2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import EOS, PAD, V, write_bigram_cache  # tests/ is on sys.path under pytest

from cache.reader import open_cache
from cache.util import UserError
from student.train import (
    CHECKPOINT,
    FINAL,
    METRICS,
    TRAINER_STATE,
    TrainConfig,
    TrainHooks,
    TrainingDiverged,
    accumulate,
    setup,
    train_student,
)
from student.train_data import split_indices

pytestmark = pytest.mark.usefixtures("one_thread")

EMB = "embeddings.word_embeddings.weight"


def tiny(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=cache, out=out, hidden_size=16, layers=1, ffn=32, window=4, max_positions=64,
                dropout=0.0, steps=4, batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0,
                save_every=0, log_every=1, num_workers=0, progress=False, chunk_size=64)
    return TrainConfig(**{**base, **kw})


def params_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / METRICS).read_text().splitlines() if ln.strip()]




@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_bigram_cache(tmp_path_factory.mktemp("bigram") / "cache")


# ------------------------------------------------------------------------------------------- config, refusals


def test_config_checks_say_what_to_do(tmp_path, cache):
    with pytest.raises(UserError, match="either --val-cache or --val-fraction"):
        tiny(cache, tmp_path, val_cache=cache, val_fraction=0.1)
    with pytest.raises(UserError, match="either --accum"):
        tiny(cache, tmp_path, accum=2, step_tokens=1000)
    with pytest.raises(UserError, match="--precision"):
        tiny(cache, tmp_path, precision="fp8")
    with pytest.raises(UserError, match="unknown KD kind"):
        tiny(cache, tmp_path, kd="forward")
    with pytest.raises(UserError, match="warmup_steps"):
        tiny(cache, tmp_path, warmup=10)
    assert TrainConfig(cache=cache, out=tmp_path, steps=20).warmup == 2
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        setup(tiny(cache, tmp_path / "a", precision="fp16", device="cpu"))


def test_refusals_name_the_problem(tmp_path, cache):
    with pytest.raises(UserError, match=r"--temperature 3 cannot be served exactly: .* temperatures 1, 2"):
        setup(tiny(cache, tmp_path / "a", temperature=3.0))
    setup(tiny(cache, tmp_path / "b", temperature=3.0, alpha=1.0))  # labels only: no temperature needed
    with pytest.raises(UserError, match="--kd sampled needs a cache written with samples"):
        setup(tiny(cache, tmp_path / "c", kd="sampled"))
    small = tmp_path / "student.json"
    small.write_text(json.dumps({"vocab_size": V - 1, "hidden_size": 8, "num_hidden_layers": 1,
                                 "intermediate_size": 8, "stft_window_size": 2,
                                 "max_position_embeddings": 64}))
    with pytest.raises(UserError, match=f"vocab_size {V - 1} does not cover .*width {V}.*--compact-vocab"):
        setup(tiny(cache, tmp_path / "d", student_config=small))
    mapped = tmp_path / "mapped.json"
    mapped.write_text(json.dumps({**json.loads(small.read_text()), "vocab_size": 3, "vocab_map": [0, 1, 2],
                                  "full_vocab_size": V}))
    with pytest.raises(UserError, match="vocab_map lacks .* token ids"):
        setup(tiny(cache, tmp_path / "e", student_config=mapped))
    with pytest.raises(UserError, match="raise --max-positions"):
        setup(tiny(cache, tmp_path / "f", max_positions=12))
    other = write_bigram_cache(tmp_path / "other-tok", n=4, tokenizer_hash="another")
    with pytest.raises(UserError, match="tokenizer hash: 'bigram-tok' vs 'another'"):
        setup(tiny(cache, tmp_path / "g", val_cache=other))


def test_renormalising_kinds_refuse_an_adaptive_k_cache(tmp_path):
    c = write_bigram_cache(tmp_path / "c", n=6, encoding="compact", top_p=0.9)
    for kind in ("topk_renorm", "reverse_kl"):
        with pytest.raises(UserError, match=f"--kd {kind} cannot read the adaptive-k"):
            setup(tiny(c, tmp_path / kind, kd=kind, temperature=1.0))
    setup(tiny(c, tmp_path / "tail", kd="topk_tail", temperature=1.0))  # exact about the padding: accepted


def test_damaged_cache_is_refused_before_training(tmp_path):
    c = write_bigram_cache(tmp_path / "c", n=6)
    shard = sorted(c.glob("unit-*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its recorded hash"):
        setup(tiny(c, tmp_path / "out"))
    (c / "manifest.json").unlink()
    with pytest.raises(UserError):
        setup(tiny(c, tmp_path / "out"))


def test_val_fraction_split_is_deterministic_and_disjoint():
    tr, va = split_indices(50, 0.2, seed=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr) & set(va) and set(tr) | set(va) == set(range(50))
    assert np.array_equal(va, split_indices(50, 0.2, seed=3)[1])
    assert not np.array_equal(va, split_indices(50, 0.2, seed=4)[1])


# --------------------------------------------------------------------------------------------- equivalences


def test_accumulation_equivalence(tmp_path):
    """(batch 8, accum 1) == (batch 2, accum 4): the same gradients from the real accumulate(), and the same
    parameters after three AdamW steps of the real loop (the 8 sequences form one step either way)."""
    from student.data import Collator

    L = 12
    c = write_bigram_cache(tmp_path / "c", n=8, equal_length=L)
    run = setup(tiny(c, tmp_path / "grad", kd="topk_tail", dropout=0.0))
    recs = [open_cache(c)[i] for i in range(8)]
    collate = Collator(pad_id=PAD)
    norm = sum(r.num_supervised for r in recs)

    def grads(groups):
        run.optimizer.zero_grad(set_to_none=True)
        sums = accumulate(run, [collate([recs[i] for i in g]) for g in groups], norm)
        return {n: p.grad.clone() for n, p in run.model.named_parameters()}, sums

    g8, s8 = grads([range(8)])
    g2, s2 = grads([range(0, 2), range(2, 4), range(4, 6), range(6, 8)])
    assert s8[4] == s2[4] == norm
    torch.testing.assert_close(s8, s2, rtol=1e-6, atol=1e-6)
    for name in g8:
        torch.testing.assert_close(g8[name], g2[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for n, g in g8.items() if "causal_stft.projection.weight" in n)
    g7, _ = grads([range(7), range(7, 8)])  # uneven micro-batches too
    torch.testing.assert_close(g7[EMB], g8[EMB], rtol=1e-5, atol=1e-7)

    # The real loop: the same losses and gradient norms at every step (parameters are not compared: Adam's
    # first steps divide by |g|, which magnifies the rounding of near-zero gradient entries).
    a = train_student(tiny(c, tmp_path / "a", batch_tokens=8 * L, accum=1, steps=3))
    b = train_student(tiny(c, tmp_path / "b", batch_tokens=2 * L, accum=4, steps=3))
    d = train_student(tiny(c, tmp_path / "d", batch_tokens=2 * L, accum=2, steps=3))
    ma, mb, md = metrics_of(a.out_dir), metrics_of(b.out_dir), metrics_of(d.out_dir)
    for key in ("loss", "ce", "kd", "grad_norm", "supervised_tokens", "tokens"):
        np.testing.assert_allclose([m[key] for m in ma], [m[key] for m in mb], rtol=2e-6, err_msg=key)
    assert md[0]["supervised_tokens"] < ma[0]["supervised_tokens"]  # a half window is another step
    assert not np.allclose([m["loss"] for m in md], [m["loss"] for m in ma], rtol=1e-3)


class Crash(Exception):
    pass


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, cache, workers):
    """Dropout on, 3 epochs of 4 steps with accumulation 2: crash after the step-5 checkpoint, resume
    (with `workers` DataLoader processes) and end with exactly the parameters of an uninterrupted run;
    the data order has no gaps or repeats."""
    kw = dict(steps=10, dropout=0.1, accum=2, batch_tokens=64, save_every=5, eval_every=4, val_fraction=0.2)
    seen_a: list[list[int]] = []
    train_student(tiny(cache, tmp_path / "a", **kw),
                  TrainHooks(micro_batch=lambda s, b: seen_a.append([s, *b.seq_ids.tolist()])))

    def crash(step):
        if step == 5:
            raise Crash

    seen_b: list[list[int]] = []
    hooks = TrainHooks(micro_batch=lambda s, b: seen_b.append([s, *b.seq_ids.tolist()]), after_step=crash)
    with pytest.raises(Crash):
        train_student(tiny(cache, tmp_path / "b", **kw), hooks)
    state = torch.load(tmp_path / "b" / CHECKPOINT / TRAINER_STATE, weights_only=True)
    assert state["state"]["step"] == 5
    seen_b = [x for x in seen_b if x[0] < 5]
    train_student(tiny(cache, tmp_path / "b", resume=True, num_workers=workers, **kw),
                  TrainHooks(micro_batch=lambda s, b: seen_b.append([s, *b.seq_ids.tolist()])))
    assert seen_a == seen_b
    train_ids, _ = split_indices(24, 0.2, seed=0)
    per_epoch: dict[int, list[int]] = {}
    steps_per_epoch = None
    for x in seen_a:  # every epoch covers each training sequence exactly once
        per_epoch.setdefault(x[0], []).extend(x[1:])
    flat = [i for s in sorted(per_epoch) for i in per_epoch[s]]
    steps_per_epoch = next(n for n in range(1, 11) if sorted(sum((per_epoch[s] for s in range(n)), []))
                           == sorted(train_ids.tolist()))
    for e in range(10 // steps_per_epoch):
        chunk = sum((per_epoch[s] for s in range(e * steps_per_epoch, (e + 1) * steps_per_epoch)), [])
        assert sorted(chunk) == sorted(train_ids.tolist()), e
    assert len(flat) >= 2 * len(train_ids)
    pa, pb = params_of(tmp_path / "a" / FINAL), params_of(tmp_path / "b" / FINAL)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    ma, mb = metrics_of(tmp_path / "a"), metrics_of(tmp_path / "b")
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    assert ma[-1]["val_ce"] == mb[-1]["val_ce"]


def test_kept_decoded_records_do_not_change_training(tmp_path):
    """A compact-encoded cache trained with every decoded record kept in memory (the default budget) and
    with none kept (--record-cache-mb 0), over 4 epochs with 2 DataLoader workers and validation:
    bit-identical weights and metrics."""
    cache = write_bigram_cache(tmp_path / "compact", encoding="compact", dtype="float16")
    kw = dict(steps=12, batch_tokens=64, eval_every=6, val_fraction=0.2, dropout=0.1)
    train_student(tiny(cache, tmp_path / "kept", num_workers=2, **kw))
    train_student(tiny(cache, tmp_path / "none", record_cache_mb=0, **kw))
    pa, pb = params_of(tmp_path / "kept" / FINAL), params_of(tmp_path / "none" / FINAL)
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    ma, mb = metrics_of(tmp_path / "kept"), metrics_of(tmp_path / "none")
    drop = ("elapsed_s", "tokens_per_s", "steps_per_s")
    assert [{k: v for k, v in m.items() if k not in drop} for m in ma] == \
        [{k: v for k, v in m.items() if k not in drop} for m in mb]
    with pytest.raises(UserError, match="record-cache-mb"):
        tiny(cache, tmp_path / "bad", record_cache_mb=-1)


def test_resume_refuses_another_config_or_cache(tmp_path, cache):
    out = tmp_path / "run"
    train_student(tiny(cache, out, steps=2))
    with pytest.raises(UserError, match="already holds a training run"):
        train_student(tiny(cache, out, steps=2))
    with pytest.raises(UserError, match=r"steps: 2 in the checkpoint, 3 now.*lr: 0\.003 in the checkpoint"):
        train_student(tiny(cache, out, steps=3, lr=1e-2, resume=True))
    other = write_bigram_cache(tmp_path / "other", n=24, seed=1)
    with pytest.raises(UserError, match="cache fingerprint: .* for --cache"):
        train_student(tiny(other, out, steps=2, resume=True))
    with pytest.raises(UserError, match="no checkpoint"):
        train_student(tiny(cache, tmp_path / "empty", resume=True))
    done = train_student(tiny(cache, out, steps=2, resume=True, num_workers=1))  # resuming a finished run
    assert done.final_metrics["step"] == 2


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    out = tmp_path / "run"
    good = {}

    def poison(step, loss):
        return loss * float("nan") if step == 3 else loss

    def remember(step):
        if step == 2:
            good.update(params_of(out / CHECKPOINT))

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4; .*checkpoint-last \(step 2\)"):
        train_student(tiny(cache, out, steps=6, save_every=2), TrainHooks(loss=poison, after_step=remember))
    assert torch.load(out / CHECKPOINT / TRAINER_STATE, weights_only=True)["state"]["step"] == 2
    kept = params_of(out / CHECKPOINT)
    assert all(torch.equal(kept[n], good[n]) and torch.isfinite(kept[n]).all() for n in kept)
    assert not (out / FINAL).exists()


def test_grad_checkpointing_gives_the_same_gradients_and_bf16_autocast_trains(tmp_path, cache):
    from student.data import Collator

    batch = Collator(pad_id=PAD)([open_cache(cache)[i] for i in range(4)])
    grads = []
    for gc in (False, True):
        run = setup(tiny(cache, tmp_path / f"gc-{gc}", grad_checkpointing=gc, layers=2))
        assert all(b.gradient_checkpointing == gc for b in run.model.encoder)
        accumulate(run, [batch], batch.num_supervised)
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8, msg=name)
    res = train_student(tiny(cache, tmp_path / "bf16", precision="bf16", steps=2))
    assert np.isfinite(res.final_metrics["loss"])
    assert all(p.dtype == torch.float32 for p in params_of(res.out_dir / FINAL).values())


def test_evaluation_matches_a_full_logits_reference(tmp_path, cache):
    """val_ce / val_kl (top-k + tail at T = 1) / val_top1_agree of the trained model, recomputed from plain
    full-vocabulary logits of final/ over the held-out records. An evaluation at step 2 comes first: the
    final one must not reuse kernels cached from those older weights (the fused AdamW step updates weights
    without bumping their version counter)."""
    from student.modeling import CausalFNetForCausalLM

    res = train_student(tiny(cache, tmp_path / "run", steps=5, val_fraction=0.25, dropout=0.1, lr=1e-2,
                             eval_every=2))
    model = CausalFNetForCausalLM.from_pretrained(res.out_dir / FINAL).eval()
    reader = open_cache(cache)
    ce = kl = agree = rows = 0.0
    for i in split_indices(len(reader), 0.25, seed=0)[1]:
        r = reader[int(i)]
        t = np.flatnonzero(r.loss_mask)
        with torch.no_grad():
            logits = model(torch.from_numpy(r.input_ids.astype(np.int64))[None]).logits[0, t - 1].double()
        logq = torch.log_softmax(logits, -1)  # (n, V)
        ids = torch.from_numpy(r.topk_ids.astype(np.int64))
        logp = torch.from_numpy(r.topk_logprobs.astype(np.float64))
        tail_p = torch.from_numpy(r.tail_mass[:, 0].astype(np.float64))
        q_tail = 1 - logq.gather(1, ids).exp().sum(1)
        kl += float((logp.exp() * (logp - logq.gather(1, ids))).sum()
                    + (tail_p * (tail_p.log() - q_tail.log())).sum())
        ce += float(-logq[torch.arange(len(t)), torch.from_numpy(r.input_ids[t].astype(np.int64))].sum())
        agree += float((logits.argmax(-1) == ids[:, 0]).sum())
        rows += len(t)
    m = res.final_metrics
    assert m["val_tokens"] == rows
    assert m["val_ce"] == pytest.approx(ce / rows, rel=1e-5)
    assert m["val_kl"] == pytest.approx(kl / rows, rel=1e-4)
    assert m["val_top1_agree"] == pytest.approx(agree / rows)


# --------------------------------------------------------------------------------------------- learning


def test_student_converges_to_the_known_teacher(tmp_path):
    """Pure KD (alpha 0, T = 1) from the bigram teacher's cache: validation KL to the teacher falls by a
    large factor and top-1 agreement rises; the sampled and reverse-KL objectives also pull it down."""
    c = write_bigram_cache(tmp_path / "c", n=48, samples=32, lengths=(16, 30))
    kw = dict(steps=100, alpha=0.0, temperature=1.0, lr=2e-2, min_lr=2e-3, warmup=5, hidden_size=32, ffn=64,
              batch_tokens=256, eval_every=100, val_fraction=0.25, log_every=10)
    res = train_student(tiny(c, tmp_path / "kd", **kw))
    evals = [m for m in metrics_of(tmp_path / "kd") if m["event"] == "eval"]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 100
    assert last["val_kl"] < first["val_kl"] / 15, (first, last)
    assert last["val_top1_agree"] > 0.7 > 0.1 > first["val_top1_agree"]  # the teacher has near ties
    assert res.final_metrics["val_kl"] == last["val_kl"]
    for kd, factor in (("sampled", 8), ("reverse_kl", 4)):  # reverse KL seeks modes: forward KL falls less
        m = train_student(tiny(c, tmp_path / kd, kd=kd, **kw)).final_metrics
        assert m["val_kl"] < first["val_kl"] / factor, (kd, m)
    assert (tmp_path / "kd" / "curves.png").stat().st_size > 1000


def test_compact_vocab_and_final_folder(tmp_path):
    """Caches that use only some ids: the compacted student has rows for the training and validation caches'
    ids (plus eos/pad), trains, evaluates on --val-cache, and its final/ loads with from_pretrained."""
    from student.modeling import CausalFNetForCausalLM

    c = write_bigram_cache(tmp_path / "c", n=12, k=3)
    val = write_bigram_cache(tmp_path / "val", n=4, k=3, seed=7)  # same teacher and tokenizer, other data
    used = set()
    for r in [*open_cache(c), *open_cache(val)]:
        used |= set(r.input_ids.tolist()) | set(r.topk_ids.ravel().tolist())
    res = train_student(tiny(c, tmp_path / "out", compact_vocab=True, steps=3, alpha=0.3, val_cache=val))
    assert {"val_ce", "val_kl", "val_top1_agree"} <= res.final_metrics.keys()
    assert res.final_metrics["val_tokens"] == sum(r.num_supervised for r in open_cache(val))
    model = CausalFNetForCausalLM.from_pretrained(res.out_dir / FINAL)
    assert model.config.vocab_map == sorted(used | {EOS, PAD}) and model.config.full_vocab_size == V
    logits = model(torch.tensor([[1, 2, 3]]), full_vocab_logits=True).logits
    assert logits.shape == (1, 3, V)
    cfg = json.loads((res.out_dir / FINAL / "train_config.json").read_text())
    assert cfg["config"]["compact_vocab"] is True and cfg["config"]["warmup"] == 1
    prov = json.loads((res.out_dir / FINAL / "provenance.json").read_text())
    assert prov["cache_fingerprint_digest"] == open_cache(c).fingerprint_digest and prov["step"] == 3
    assert prov["val_cache_fingerprint_digest"] == open_cache(val).fingerprint_digest
    assert not any(k.startswith("_orig_mod.") for k in params_of(res.out_dir / FINAL))


# ------------------------------------------------------------------------------- the real CLI, real cache


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory, tiny_qwen_dir, qwen_tokenizer_dir, gsm8k_slice) -> Path:
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    out = tmp_path_factory.mktemp("real") / "cache"
    run_teacher_cache(TeacherCacheConfig(teacher=str(tiny_qwen_dir), dataset=str(gsm8k_slice), out=out,
                                         tokenizer=str(qwen_tokenizer_dir), topk=8, limit=6,
                                         batch_tokens=2048,
                                         device="cpu", progress=False, unit_size=4))
    return out


def test_cli_end_to_end_on_a_real_cache(tmp_path, real_cache, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from student.modeling import CausalFNetForCausalLM

    out = tmp_path / "student"
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", "train-student", "--cache",
           str(real_cache), "--out", str(out), "--val-fraction", "0.34", "--compact-vocab",
           "--hidden-size", "16", "--layers", "1", "--ffn", "32", "--window", "8", "--steps", "3",
           "--batch-tokens", "1024",
           "--eval-every", "2", "--num-workers", "0", "--no-progress", "--seed", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "trained 3 steps" in res.stdout
    model = CausalFNetForCausalLM.from_pretrained(out / FINAL)
    tok = AutoTokenizer.from_pretrained(out / FINAL)
    ids = tok("12 + 7", return_tensors="pt").input_ids
    logits = model(ids, full_vocab_logits=True).logits
    assert logits.shape[-1] == open_cache(real_cache).vocab_size
    # the teacher's padded rows (ids past the tokenizer) are in the map, but never emitted
    assert model.config.num_tokenizer_ids == len(tok) < max(model.config.vocab_map)
    assert torch.isneginf(logits[..., len(tok):]).all() and torch.isfinite(logits[..., ids[0]]).all()
    card = (out / FINAL / "README.md").read_text()
    assert "34.0% of the training cache's sequences, held out" in card and f"Ids from {len(tok):,} on" in card
    events = metrics_of(out)
    assert {"train", "eval"} <= {m["event"] for m in events}
    assert all(np.isfinite(m["loss"]) for m in events if m["event"] == "train")
    assert (out / "curves.png").exists()

    from pipeline.cli import main

    monkeypatch.setattr(sys, "argv", ["fnet-distill", *cmd[3:-2], "--seed", "2", "--resume"])
    capsys.readouterr()  # what loading the model above printed (its bar, when no command has turned it off)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --resume:")
    assert "seed: 1 in the checkpoint, 2 now" in lines[0]


def test_every_evaluation_is_a_line_on_stderr_also_in_a_log(tmp_path, capsys):
    """With stderr not a terminal (a log file), each evaluation prints its validation CE, KL and agreement."""
    cache = write_bigram_cache(tmp_path / "train", n=12)
    val = write_bigram_cache(tmp_path / "val", n=6, seed=9)
    train_student(tiny(cache, tmp_path / "out", val_cache=val, steps=4, eval_every=2, progress=True))
    err = capsys.readouterr().err
    for step in (0, 2, 4):
        line = next(x for x in err.splitlines() if x.startswith(f"eval step {step}: "))
        assert "val CE" in line and "KL to the teacher" in line and "top-1 agreement" in line
    metrics = [json.loads(x) for x in (tmp_path / "out" / METRICS).read_text().splitlines()]
    last = [m for m in metrics if m.get("event") == "eval"][-1]
    assert f"eval step 4: val CE {last['val_ce']:.4f}" in err
