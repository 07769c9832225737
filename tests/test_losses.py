"""Distillation losses against independent references: full-vocabulary KL, float64 bucket distributions,
closed forms; chunked == unchunked in value and gradient; token-weighted normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cache.util import UserError
from student.chunked_loss import chunked_distill_loss, loss_fn_for
from student.losses import (
    KD_KINDS,
    DistillTargets,
    LossConfig,
    combine_loss,
    distill_loss_sums,
    grad_weights_for,
    kd_sum,
)


def cache_fields(z: torch.Tensor, k: int, temperature: float):
    """The cache's view of teacher logits z (N, V), computed as docs/cache-spec.md defines it."""
    lp1 = F.log_softmax(z, -1)
    topk_lp, ids = lp1.topk(k, dim=-1)
    zt = z / temperature
    lse_t = torch.logsumexp(zt, -1)
    shift = torch.logsumexp(z, -1) / temperature - lse_t
    if k == z.shape[1]:
        tail = torch.zeros(z.shape[0])
    else:
        tail = torch.logsumexp(zt.scatter(1, ids, float("-inf")), -1).sub(lse_t).exp()
    return ids, topk_lp, shift, tail


def make_targets(z, labels, k, temperature, samples=None):
    ids, lp, shift, tail = cache_fields(z, k, temperature)
    s_ids = s_counts = None
    if samples is not None:
        s_ids, s_counts = samples
    return DistillTargets(labels=labels, topk_ids=ids, topk_logprobs=lp, shift=shift, tail=tail,
                          sample_ids=s_ids, sample_counts=s_counts)


def draw_samples(z, num_draws, gen):
    """Random-Sampling KD targets at T = 1: unique ids per row, padded to (N, S) with count 0."""
    p = F.softmax(z.double(), -1)
    rows = []
    for r in range(z.shape[0]):
        draws = torch.multinomial(p[r], num_draws, replacement=True, generator=gen)
        u, c = draws.unique(return_counts=True)
        rows.append((u, c))
    s = max(len(u) for u, _ in rows)
    ids = torch.zeros(z.shape[0], s, dtype=torch.int64)
    counts = torch.zeros(z.shape[0], s)
    for r, (u, c) in enumerate(rows):
        ids[r, : len(u)] = u
        counts[r, : len(c)] = c.float()
    return ids, counts


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def rand_problem(gen, n=6, v=40, scale=3.0):
    z = torch.randn(n, v, generator=gen) * scale
    s = torch.randn(n, v, generator=gen) * scale
    labels = torch.randint(0, v, (n,), generator=gen)
    return z, s, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_full_vocab_equals_kl_div(gen, temperature):
    z, s, labels = rand_problem(gen)
    t = make_targets(z, labels, k=z.shape[1], temperature=temperature)
    assert torch.all(t.tail == 0)
    logp = F.log_softmax(z / temperature, -1)
    logq = F.log_softmax(s / temperature, -1)
    forward = F.kl_div(logq, logp, log_target=True, reduction="sum")
    reverse = F.kl_div(logp, logq, log_target=True, reduction="sum")
    torch.testing.assert_close(kd_sum(s, t, "topk_tail", temperature), forward, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kd_sum(s, t, "topk_renorm", temperature), forward, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kd_sum(s, t, "reverse_kl", temperature), reverse, rtol=1e-4, atol=1e-4)
    sums = distill_loss_sums(s, t, "topk_tail", temperature)
    torch.testing.assert_close(sums.ce, F.cross_entropy(s, labels, reduction="sum"))
    assert int(sums.top1_agree) == int((s.argmax(-1) == z.argmax(-1)).sum())


def test_topk_tail_uniform_student_closed_form():
    # V = 8, k = 2, teacher p = (0.5, 0.3) with tail 0.2, student uniform (all logits equal), T = 1:
    # q_i = 1/V, q_tail = (V - k)/V, so KL = 0.5 ln(0.5 V) + 0.3 ln(0.3 V) + 0.2 ln(0.2 V / (V - k)).
    v, k = 8, 2
    t = DistillTargets(labels=torch.tensor([0]), topk_ids=torch.tensor([[3, 5]]),
                       topk_logprobs=torch.tensor([[0.5, 0.3]]).log(), shift=torch.zeros(1),
                       tail=torch.tensor([0.2]))
    expected = 0.5 * math.log(0.5 * v) + 0.3 * math.log(0.3 * v) + 0.2 * math.log(0.2 * v / (v - k))
    assert kd_sum(torch.zeros(1, v), t, "topk_tail", 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_topk_tail_uniform_teacher_tail_matches_full_kl_minus_derived_gap(gen):
    # Teacher: top-k probabilities p_i plus tail mass P spread uniformly over the m = V - k other ids.
    # Full KL = sum_K p_i ln(p_i/q_i) + sum_{v not in K} (P/m) ln((P/m)/q_v), bucket KL replaces the second
    # sum by P ln(P/Q) with Q = sum_{v not in K} q_v. Their gap is P * (ln(Q/m) - mean_{v not in K} ln q_v)
    # (>= 0 by Jensen, 0 iff the student is uniform on the tail).
    n, v, k = 5, 30, 6
    s = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    head = torch.rand(n, k, generator=gen, dtype=torch.float64) + 0.1
    tail_p = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    head = head / head.sum(-1, keepdim=True) * (1 - tail_p)[:, None]
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    full_p = (tail_p / (v - k))[:, None].expand(n, v).clone().scatter(1, ids, head)
    logq = F.log_softmax(s, -1)
    full_kl = (full_p * (full_p.log() - logq)).sum(-1)
    in_k = torch.zeros(n, v, dtype=torch.bool).scatter(1, ids, True)
    logq_tail_mean = logq.masked_fill(in_k, 0).sum(-1) / (v - k)
    big_q = logq.exp().masked_fill(in_k, 0).sum(-1)
    gap = tail_p * ((big_q / (v - k)).log() - logq_tail_mean)
    t = DistillTargets(labels=torch.zeros(n, dtype=torch.int64), topk_ids=ids,
                       topk_logprobs=head.log().float(), shift=torch.zeros(n), tail=tail_p.float())
    got = kd_sum(s.float(), t, "topk_tail", 1.0)
    torch.testing.assert_close(got.double(), (full_kl - gap).sum(), rtol=1e-5, atol=1e-5)
    assert (gap > 0).all()


def _with_tail_bucket(x):
    return torch.cat([x, 1 - x.sum(-1, keepdim=True)], -1)


def bucket_reference(z, s, k, temperature):
    """Float64 teacher/student bucket distributions [p_topk..., tail] and [q_topk..., 1 - sum q_topk]."""
    p = F.softmax(z.double() / temperature, -1)
    q = F.softmax(s.double() / temperature, -1)
    ids = z.topk(k, -1).indices
    pk, qk = p.gather(1, ids), q.gather(1, ids)
    return _with_tail_bucket(pk), _with_tail_bucket(qk)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kinds_vs_independent_references(gen, temperature):
    z, s, labels = rand_problem(gen, n=7, v=50, scale=2.0)
    k = 5
    t = make_targets(z, labels, k, temperature)
    pb, qb = bucket_reference(z, s, k, temperature)
    forward = (pb * (pb.log() - qb.log())).sum()
    reverse = (qb * (qb.log() - pb.log())).sum()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(kd_sum(s, t, "topk_tail", temperature).double(), forward, **tol)
    torch.testing.assert_close(kd_sum(s, t, "reverse_kl", temperature).double(), reverse, **tol)
    ids = t.topk_ids
    renorm = F.kl_div(F.log_softmax(s.gather(1, ids) / temperature, -1),
                      F.log_softmax(z.gather(1, ids) / temperature, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(kd_sum(s, t, "topk_renorm", temperature), renorm, rtol=1e-4, atol=1e-5)


def test_sampled_vs_dense_reference(gen):
    z, s, labels = rand_problem(gen, n=5, v=30)
    samples = draw_samples(z, 16, gen)
    t = make_targets(z, labels, 4, 2.0, samples)
    dense = torch.zeros_like(z).scatter_add(1, samples[0], samples[1])
    dense = dense / dense.sum(-1, keepdim=True)
    for temperature in (1.0, 2.0):
        ref = -(dense * F.log_softmax(s / temperature, -1)).sum()
        torch.testing.assert_close(kd_sum(s, t, "sampled", temperature), ref)
    with pytest.raises(UserError, match="samples"):
        kd_sum(s, make_targets(z, labels, 4, 2.0), "sampled", 1.0)


def test_sampled_is_unbiased_for_full_forward_kl_at_t1(gen):
    z, _, labels = rand_problem(gen, n=4, v=25, scale=1.5)
    s = (torch.randn(4, 25, generator=gen) * 1.5).requires_grad_()
    t = make_targets(z, labels, 3, 1.0, draw_samples(z, 200_000, gen))
    sampled = kd_sum(s, t, "sampled", 1.0)
    (g_sampled,) = torch.autograd.grad(sampled, s)
    p = F.softmax(z, -1)
    full_ce = -(p * F.log_softmax(s, -1)).sum()
    full_kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(z, -1), log_target=True, reduction="sum")
    (g_kl,) = torch.autograd.grad(full_kl, s)
    assert sampled.item() == pytest.approx(full_ce.item(), rel=5e-3)
    assert F.cosine_similarity(g_sampled.flatten(), g_kl.flatten(), dim=0) > 0.99


def _problem_for_chunks(gen, n, v=37, d=8, k=5):
    z = torch.randn(n, v, generator=gen) * 2
    labels = torch.randint(0, v, (n,), generator=gen)
    t = make_targets(z, labels, k, 2.0, draw_samples(z, 8, gen))
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen)
    return hidden, weight, t


def _assert_same_loss_and_grads(a, b) -> None:
    """(sums, loss, grad wrt hidden, grad wrt head weight) of two implementations agree."""
    (s1, l1, gh1, gw1), (s0, l0, gh0, gw0) = a, b
    torch.testing.assert_close(s1.ce, s0.ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.kd, s0.kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)
    assert int(s1.top1_agree) == int(s0.top1_agree)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("n,chunk", [(7, 3), (7, 1), (7, 100), (12, 4), (1, 5)])
def test_chunked_equals_unchunked_value_and_gradient(gen, kind, n, chunk):
    hidden, weight, t = _problem_for_chunks(gen, n)
    cfg = LossConfig(kind=kind, alpha=0.3, temperature=2.0)

    def run(chunked: bool):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if chunked:
            sums = chunked_distill_loss(h, w, t, kind=kind, temperature=2.0, chunk_size=chunk)
        else:
            sums = distill_loss_sums(h @ w.T, t, kind, 2.0)
        loss = combine_loss(sums, alpha=cfg.alpha, temperature=cfg.temperature, normalizer=n)
        gh, gw = torch.autograd.grad(loss, [h, w])
        return sums, loss, gh, gw

    s1, l1, gh1, gw1 = run(True)
    s0, l0, gh0, gw0 = run(False)
    _assert_same_loss_and_grads((s1, l1, gh1, gw1), (s0, l0, gh0, gw0))
    correct = int(((hidden @ weight.T).argmax(-1) == t.labels).sum())
    assert int(s1.label_correct) == int(s0.label_correct) == correct


def test_chunked_never_saves_full_logits(gen):
    n, v, d = 40, 300, 8
    hidden, weight, t = _problem_for_chunks(gen, n, v=v, d=d)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        chunked = chunked_distill_loss(h, w, t, chunk_size=8)
    assert saved and max(saved) <= max(n * d, v * d)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        distill_loss_sums(h @ w.T, t)
    assert max(saved) >= n * v  # the reference does keep (N, V): the check above can fail
    (chunked.ce + chunked.kd).backward()
    assert h.grad is not None and w.grad is not None


def test_token_weighted_normalisation_across_micro_batches(gen):
    # 10 supervised rows split 7 + 3 over two micro-batches of one window == one batch of 10.
    hidden, weight, t = _problem_for_chunks(gen, 10)

    def grads(splits, per_micro_mean=False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        total = 0.0
        for a, b in splits:
            sums = chunked_distill_loss(h[a:b], w, t.rows(a, b), chunk_size=4)
            norm = (b - a) * len(splits) if per_micro_mean else 10
            loss = combine_loss(sums, alpha=0.5, temperature=2.0, normalizer=norm)
            loss.backward()
            total += loss.item()
        return total, h.grad, w.grad

    one = grads([(0, 10)])
    two = grads([(0, 7), (7, 10)])
    assert two[0] == pytest.approx(one[0], rel=1e-6)
    torch.testing.assert_close(two[1], one[1])
    torch.testing.assert_close(two[2], one[2])
    wrong = grads([(0, 7), (7, 10)], per_micro_mean=True)
    assert wrong[0] != pytest.approx(one[0], rel=1e-3)


def test_bf16_hidden_and_alpha_one(gen):
    hidden, weight, t = _problem_for_chunks(gen, 9)
    ref = chunked_distill_loss(hidden, weight, t, chunk_size=4)
    low = chunked_distill_loss(hidden.bfloat16(), weight, t, chunk_size=4)
    assert low.ce.dtype == torch.float32
    torch.testing.assert_close(low.ce, ref.ce, rtol=3e-2, atol=0.5)
    h = hidden.clone().requires_grad_()
    no_kd = chunked_distill_loss(h, weight, t, with_kd=False)
    assert no_kd.kd.item() == 0.0
    torch.testing.assert_close(no_kd.ce, ref.ce)
    no_kd.ce.backward()
    assert h.grad is not None


def test_loss_config_validation():
    LossConfig()
    for bad in (dict(kind="forward"), dict(alpha=1.5), dict(temperature=0), dict(chunk_size=0)):
        with pytest.raises(UserError):
            LossConfig(**bad)


def test_map_ids_for_a_compacted_head_equals_full_head_without_the_missing_rows(gen):
    # A compacted student keeps only the rows in vocab_map; its loss on mapped targets must equal the
    # full-vocabulary loss with the other rows' logits at -inf (what to_full_vocab produces).
    n, v, d = 6, 40, 8
    vocab_map = torch.tensor(sorted(torch.randperm(v, generator=gen)[:25].tolist()))
    lookup = torch.full((v,), -1, dtype=torch.int64)
    lookup[vocab_map] = torch.arange(len(vocab_map))
    z = torch.full((n, v), -30.0)
    z[:, vocab_map] = torch.randn(n, len(vocab_map), generator=gen) * 2  # teacher mass on mapped ids only
    labels = vocab_map[torch.randint(0, len(vocab_map), (n,), generator=gen)]
    t = make_targets(z, labels, 5, 2.0, draw_samples(z, 12, gen))
    hidden = torch.randn(n, d, generator=gen)
    head = torch.randn(len(vocab_map), d, generator=gen)
    for kind in KD_KINDS:
        mapped = t.map_ids(lambda ids: lookup[ids])
        compact = chunked_distill_loss(hidden, head, mapped, kind=kind, chunk_size=4)
        full_logits = torch.full((n, v), -1e4)
        full_logits[:, vocab_map] = hidden @ head.T
        ref = distill_loss_sums(full_logits, t, kind, 2.0)
        torch.testing.assert_close(compact.ce, ref.ce)
        torch.testing.assert_close(compact.kd, ref.kd, rtol=1e-5, atol=1e-5)
    outside = int(torch.nonzero(lookup < 0)[0])
    bad = DistillTargets(labels=torch.tensor([outside]), topk_ids=t.topk_ids[:1],
                         topk_logprobs=t.topk_logprobs[:1], shift=t.shift[:1], tail=t.tail[:1])
    with pytest.raises(UserError, match="vocab_map"):
        bad.map_ids(lambda ids: lookup[ids])


def _chunked_vs_reference(hidden, weight, t, kind, temperature, chunk, alpha=0.3):
    def run(chunked: bool):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if chunked:
            sums = chunked_distill_loss(h, w, t, kind=kind, temperature=temperature, chunk_size=chunk)
        else:
            sums = distill_loss_sums(h @ w.T, t, kind, temperature)
        loss = combine_loss(sums, alpha=alpha, temperature=temperature, normalizer=len(t))
        return (sums, loss, *torch.autograd.grad(loss, [h, w]))

    return run(True), run(False)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7, 1.5])
def test_chunked_equals_unchunked_at_every_temperature_path(gen, kind, temperature):
    # T = 1, T = 2 and any other T take different fused paths in the chunked loss.
    n, v, d = 9, 41, 8
    z = torch.randn(n, v, generator=gen) * 2
    labels = torch.randint(0, v, (n,), generator=gen)
    t = make_targets(z, labels, 6, temperature, draw_samples(z, 8, gen))
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen)
    _assert_same_loss_and_grads(*_chunked_vs_reference(hidden, weight, t, kind, temperature, 4))


@pytest.mark.parametrize("kind", ["topk_tail", "reverse_kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_chunked_tail_bucket_when_the_student_tail_is_tiny_or_empty(gen, kind, temperature):
    # logits = hidden (weight = identity). Rows put +-g on the teacher's top-k vs the rest, so the student
    # tail mass Q spans ~1 down to far below fp32's range (exp(-120 / T)); the chunked loss must still
    # equal the reference's exact LSE over the non-top-k logits, in value and gradient.
    n, v, k = 8, 30, 5
    z = torch.randn(n, v, generator=gen) * 2
    labels = torch.randint(0, v, (n,), generator=gen)
    t = make_targets(z, labels, k, temperature)
    in_k = torch.zeros(n, v, dtype=torch.bool).scatter(1, t.topk_ids, True)
    gaps = torch.tensor([0.0, 2.0, 10.0, 20.0, 35.0, 60.0, 120.0, 200.0])[:, None]
    hidden = torch.randn(n, v, generator=gen) + torch.where(in_k, gaps / 2, -gaps / 2)
    weight = torch.eye(v)
    (s1, l1, gh1, gw1), (s0, l0, gh0, gw0) = _chunked_vs_reference(hidden, weight, t, kind, temperature, 3)
    torch.testing.assert_close(s1.kd, s0.kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)
    full = make_targets(z, labels, v, temperature)  # k == V: an empty tail on both sides
    (s1, l1, gh1, _), (s0, l0, gh0, _) = _chunked_vs_reference(hidden, weight, full, kind, temperature, 3)
    assert torch.isfinite(s1.kd) and torch.isfinite(gh1).all()
    torch.testing.assert_close(s1.kd, s0.kd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-6)


def test_chunked_bf16_hidden_gradients_follow_the_bf16_reference(gen):
    # bf16 hidden states: the head matmul runs in bf16 and the rest in fp32, as an autograd reference that
    # casts the same way; value and gradients stay close to the fp32 ones.
    hidden, weight, t = _problem_for_chunks(gen, 11)
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    sums = chunked_distill_loss(h, w, t, chunk_size=4)
    gh, gw = torch.autograd.grad(sums.ce + sums.kd, [h, w])
    h0 = hidden.bfloat16().requires_grad_()
    w0 = weight.clone().requires_grad_()
    ref = distill_loss_sums((h0 @ w0.bfloat16().T).float(), t)
    gh0, gw0 = torch.autograd.grad(ref.ce + ref.kd, [h0, w0])
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(sums.kd, ref.kd, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gh.float(), gh0.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, gw0, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_gradients_computed_in_forward_equal_the_reference(gen, kind, temperature):
    # grad_weights: forward computes the gradients of alpha * CE + (1 - alpha) T^2 KD; backward only scales
    # them by the normaliser. Same value and gradients as the unchunked reference.
    hidden, weight, t = _problem_for_chunks(gen, 10)
    cfg = LossConfig(kind=kind, alpha=0.3, temperature=temperature, chunk_size=4)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    sums = loss_fn_for(cfg)(h, w, t)
    loss = combine_loss(sums, alpha=cfg.alpha, temperature=temperature, normalizer=10) * 2.0
    gh, gw = torch.autograd.grad(loss, [h, w])
    h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = distill_loss_sums(h0 @ w0.T, t, kind, temperature)
    loss0 = combine_loss(ref, alpha=cfg.alpha, temperature=temperature, normalizer=10) * 2.0
    gh0, gw0 = torch.autograd.grad(loss0, [h0, w0])
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, gh0, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, gw0, rtol=1e-4, atol=1e-6)


def test_gradients_in_forward_fall_back_when_backward_weighs_differently(gen):
    # A backward that does not weigh CE and KD as announced (here KD alone, then CE alone) must still get
    # the true gradients: the chunked loss recomputes them instead of scaling the precomputed ones.
    hidden, weight, t = _problem_for_chunks(gen, 9)
    for pick in ("kd", "ce"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        sums = chunked_distill_loss(h, w, t, chunk_size=4, grad_weights=grad_weights_for(0.5, 2.0))
        gh, gw = torch.autograd.grad(getattr(sums, pick), [h, w])
        h0, w0 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        gh0, gw0 = torch.autograd.grad(getattr(distill_loss_sums(h0 @ w0.T, t), pick), [h0, w0])
        torch.testing.assert_close(gh, gh0, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gw, gw0, rtol=1e-4, atol=1e-6)
    h = hidden.clone().requires_grad_()
    with_ce_only = chunked_distill_loss(h, weight, t, chunk_size=4, with_kd=False, grad_weights=(1.0, 0.0))
    (g,) = torch.autograd.grad(with_ce_only.ce * 3.0, [h])
    h0 = hidden.clone().requires_grad_()
    (g0,) = torch.autograd.grad(F.cross_entropy(h0 @ weight.T, t.labels, reduction="sum") * 3.0, [h0])
    torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        no_grad = chunked_distill_loss(hidden, weight, t, chunk_size=4, grad_weights=(1.0, 1.0))
    torch.testing.assert_close(no_grad.kd, distill_loss_sums(hidden @ weight.T, t).kd, rtol=1e-5, atol=1e-5)
