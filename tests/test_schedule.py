"""lr_at at its boundaries; AdamW decay groups by parameter identity; decoupled decay actually applied."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cache.util import UserError
from student.schedule import (
    OptimizerConfig,
    ScheduleConfig,
    build_optimizer,
    lr_at,
    set_lr,
    split_decay_params,
)


def test_lr_at_boundaries():
    cfg = ScheduleConfig(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way through the cosine: the midpoint
    assert lr_at(35, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(10_000, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    with pytest.raises(ValueError):
        lr_at(-1, cfg)


def test_lr_at_degenerate_configs():
    no_warmup = ScheduleConfig(lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=4)
    assert [lr_at(s, no_warmup) for s in range(5)] == pytest.approx([2.0, 1.0 + 2 ** -0.5, 1.0,
                                                                     1.0 - 2 ** -0.5, 0.0])
    all_warmup = ScheduleConfig(lr=1.0, min_lr=0.5, warmup_steps=4, total_steps=4)
    assert [lr_at(s, all_warmup) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.5, 0.5])


@pytest.mark.parametrize("bad", [dict(lr=0), dict(min_lr=2e-3), dict(warmup_steps=3000), dict(total_steps=0),
                                 dict(min_lr=-1.0)])
def test_schedule_config_validation(bad):
    with pytest.raises(UserError):
        ScheduleConfig(**bad)


class MyRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))


class TinyLM(nn.Module):
    def __init__(self, v=11, d=4, length=6):
        super().__init__()
        self.wte = nn.Embedding(v, d)
        self.wpe = nn.Embedding(length, d)
        self.pos_embed = nn.Parameter(torch.randn(length, d))
        self.block = nn.Linear(d, d)
        self.mix = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d)
        self.norm = MyRMSNorm(d)
        self.lm_head = nn.Linear(d, v, bias=False)
        self.lm_head.weight = self.wte.weight
        self.frozen = nn.Parameter(torch.ones(d, d), requires_grad=False)


def ids(params):
    return {id(p) for p in params}


def test_decay_groups_by_identity():
    m = TinyLM()
    decay, no_decay = split_decay_params(m)
    assert ids(decay) == {id(m.block.weight), id(m.mix.weight)}
    assert ids(no_decay) == {id(m.wte.weight), id(m.wpe.weight), id(m.pos_embed), id(m.block.bias),
                             id(m.ln.weight), id(m.ln.bias), id(m.norm.scale)}
    assert id(m.lm_head.weight) in ids(no_decay)
    assert len(decay) + len(no_decay) == len({id(p) for p in m.parameters() if p.requires_grad})


def test_tied_head_declared_before_embedding_is_still_not_decayed():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 9, bias=False)
            self.emb = nn.Embedding(9, 4)
            self.emb.weight = self.lm_head.weight

    m = HeadFirst()
    decay, no_decay = split_decay_params(m)
    assert decay == [] and [id(p) for p in no_decay] == [id(m.lm_head.weight)]


def test_adamw_decoupled_decay_and_set_lr():
    torch.manual_seed(0)
    m = TinyLM()
    sched = ScheduleConfig(lr=0.5, min_lr=0.0, warmup_steps=0, total_steps=10)
    opt = build_optimizer(m, sched, OptimizerConfig(weight_decay=0.2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: the Adam update is 0, only the decoupled decay moves weights
    torch.testing.assert_close(m.block.weight, before["block.weight"] * (1 - 0.5 * 0.2))
    torch.testing.assert_close(m.mix.weight, before["mix.weight"] * (1 - 0.5 * 0.2))
    for name in ("wte.weight", "wpe.weight", "pos_embed", "block.bias", "ln.weight", "norm.scale"):
        torch.testing.assert_close(dict(m.named_parameters())[name], before[name])
    set_lr(opt, 0.125)
    assert all(g["lr"] == 0.125 for g in opt.param_groups)


def test_decay_groups_of_the_real_student():
    from student.modeling import CausalFNetConfig, CausalFNetForCausalLM

    m = CausalFNetForCausalLM(CausalFNetConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2,
                                               intermediate_size=16, max_position_embeddings=32,
                                               stft_window_size=4))
    assert m.lm_head.weight is m.embeddings.word_embeddings.weight
    decay, no_decay = split_decay_params(m)
    names = {id(p): n for n, p in m.named_parameters()}
    matrices = {n for n, p in m.named_parameters() if p.ndim == 2 and "embeddings" not in n}
    assert {names[id(p)] for p in decay} == matrices
    assert {"embeddings.word_embeddings.weight", "embeddings.pos_embeddings.weight"} <= {
        names[id(p)] for p in no_decay}
    assert all(p.ndim < 2 for p in no_decay if "embeddings" not in names[id(p)])


def test_fused_cpu_adamw_equals_the_reference_loop_and_clears_the_students_kernel_cache():
    """build_optimizer fuses on the CPU too: its steps equal torch's per-tensor AdamW (the independent
    reference) within float rounding. A fused step does not bump the weights' version counter, so the
    student's eval-mode kernel cache must be cleared by train()/eval(): an evaluation after a fused step
    equals a fresh copy of the same weights."""
    from student.modeling import CausalFNetConfig, CausalFNetForCausalLM

    cfg = CausalFNetConfig(vocab_size=50, hidden_size=8, num_hidden_layers=2, intermediate_size=16,
                           max_position_embeddings=32, stft_window_size=4, hidden_dropout_prob=0.0)
    torch.manual_seed(0)
    m = CausalFNetForCausalLM(cfg)
    ref = CausalFNetForCausalLM(cfg)
    ref.load_state_dict(m.state_dict())
    sched = ScheduleConfig(lr=1e-2, min_lr=1e-2, warmup_steps=0, total_steps=10)
    opt = build_optimizer(m, sched, OptimizerConfig(weight_decay=0.1))
    assert opt.defaults["fused"]
    ref_opt = build_optimizer(ref, sched, OptimizerConfig(weight_decay=0.1), fused=False)
    ids = torch.randint(0, 50, (2, 12))
    m.eval()
    with torch.no_grad():
        before = m(ids).logits  # fills the kernel cache with the initial weights
    for _ in range(3):
        for model, o in ((m, opt), (ref, ref_opt)):
            model.train()
            model(ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        # 3 steps at lr 1e-2 move every weight by about 3e-2; the two kernels' rounding differs by < 2e-6
        # where Adam divides near-zero gradient moments (the STFT projection)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)
    mixer = next(mod for mod in m.modules() if type(mod).__name__ == "CausalSTFT")
    stale_version = mixer.projection.weight._version
    m.eval()
    with torch.no_grad():
        after = m(ids).logits
        fresh = CausalFNetForCausalLM(cfg)
        fresh.load_state_dict(m.state_dict())
        expected = fresh.eval()(ids).logits
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before)
    # the hazard itself: the fused steps left the version counter where the cache key saw it
    assert stale_version == mixer.projection.weight._version
