"""The fused, chunked head + distillation loss that training runs (``chunked_distill_loss``).

It computes the student's head (hidden states x head weight) and the CE and KD sums of ``student.losses``
in chunks of positions, and forms the logit gradients of each chunk in one fused pass, so the
(positions x vocab) logits never exist whole. Values and gradients equal ``distill_loss_sums`` on the full
logits (tested for every KD kind); the definitions (targets, KD kinds, temperatures, ``combine_loss``) live in
``student.losses``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cache.util import UserError
from student.losses import (
    KD_KINDS,
    NEG_LOGIT,
    TINY_PROB,
    DistillTargets,
    LossConfig,
    LossSums,
    grad_weights_for,
    teacher_logprobs,
)


@dataclass
class _RowStats:
    """What forward keeps per row so that backward can write dL/dlogits in one fused expression.

    With q = softmax(z / T) and p1 = softmax(z), the gradient of one chunk is
    ``g_ce * (p1 - onehot(label)) + g_kd / T * (alpha * q + ...)`` on every column, then on ``cols``:
    ``+ g_kd / T * beta`` (``p1_cols`` is None), or, for the tail kinds, the exact value
    ``g_ce * p1_cols + g_kd / T * beta`` written over it. Writing the top-k columns instead of correcting
    them avoids cancelling the huge ``alpha * q`` (alpha holds 1 / Q, Q the student's tail mass) there.
    Rows in ``tail_rows`` (Q below ``_TAIL_FLOOR``) add ``tail_coef * r`` instead, with r the exact
    softmax over their non-top-k logits.
    """

    lse1: Tensor  # (n,) logsumexp(z)
    lse_t: Tensor  # (n,) logsumexp(z / T)
    alpha: Tensor  # (n,)
    beta: Tensor  # (n, j)
    cols: Tensor  # (n, j) the columns beta lands on (top-k or sampled ids)
    p1_cols: Tensor | None  # (n, j)
    tail_rows: Tensor  # (f,) int64
    tail_coef: Tensor  # (f,)


# Below this student tail mass Q the shifted-domain sum loses the tail to underflow and q / Q is not
# representable: such rows get the exact LSE over their non-top-k logits instead (rare, recomputed).
_TAIL_FLOOR = 1e-20


def _logits(h: Tensor, w: Tensor, out: Tensor) -> Tensor:
    """fp32 (c, V) logits ``h @ w.T`` written into ``out`` (the matmul runs in h's dtype)."""
    if h.dtype == torch.float32:
        return torch.mm(h, w.t(), out=out)
    return out.copy_(h @ w.t())


def _scaled_logits(h: Tensor, w: Tensor, scale: float, shift: Tensor, out: Tensor) -> Tensor:
    """fp32 (c, V) ``scale * (h @ w.T) - shift[:, None]`` into ``out``, one pass when h is fp32."""
    if h.dtype == torch.float32:
        return torch.addmm(shift[:, None].neg(), h, w.t(), alpha=scale, out=out)
    return _logits(h, w, out).mul_(scale).sub_(shift[:, None])


def _tail_exact(logits: Tensor, cols: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """log Q (f,) and r = softmax over the non-``cols`` entries of logits / T (f, V), as the reference."""
    rest = F.log_softmax(logits / temperature, dim=-1).scatter_(1, cols, NEG_LOGIT)  # (f, V)
    log_tail = torch.logsumexp(rest, dim=-1)
    return log_tail, rest.sub_(log_tail[:, None]).exp_()


@dataclass
class _Numerators:
    """The softmax numerators forward leaves in its buffers: e1 = exp(z - m), e_t = exp((z - m) / T)."""

    e1: Tensor  # (c, V)
    s1: Tensor  # (c,) row sums of e1
    e_t: Tensor | None  # (c, V); None when KD needs no dense q (e1 is e_t when T == 1)
    s_t: Tensor | None


def _chunk_forward(h: Tensor, w: Tensor, t: DistillTargets, kind: str, temperature: float, with_kd: bool,
                   buf: Tensor, buf2: Tensor | None,
                   keep_q: bool = False, pred_shift: Tensor | None = None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, _RowStats, _Numerators]:
    """CE and KD sums of one chunk, the two metric counts, the per-row gradient coefficients and the
    softmax numerators.

    One fp32 (c, V) logits buffer (plus a second one when T is neither 1 nor 2, or with ``keep_q`` at
    T = 2): max and argmax in one pass, exp in place, the T = 2 softmax numerators squared into the T = 1
    ones (in place unless ``keep_q``). ``pred_shift`` (V,) is subtracted from the logits for the argmax
    only."""
    T = temperature
    z = _logits(h, w, buf)  # (c, V)
    m, pred = torch.max(z, dim=-1)
    if pred_shift is not None:
        pred = torch.argmax(z - pred_shift, dim=-1)
    z_label = z.gather(1, t.labels[:, None])[:, 0]
    need_kd = with_kd and kind != "topk_renorm"
    cols = None
    if with_kd:
        if kind == "sampled" and t.sample_ids is None:
            raise UserError("KD kind 'sampled' needs a cache written with samples; rebuild it with "
                            "--samples N or choose another --kd")
        cols = t.sample_ids if kind == "sampled" else t.topk_ids
        z_cols = z.gather(1, cols)  # (c, j)
    z.sub_(m[:, None])
    log_tail_e = None
    if need_kd:
        if T == 1.0:
            e_t = z.exp_()  # (c, V) exp((z - m) / T)
        elif T == 2.0:
            e_t = z.mul_(0.5).exp_()
        else:
            e_t = torch.mul(z, 1.0 / T, out=buf2).exp_()
        s_t = e_t.sum(-1)
        if kind != "sampled":
            e_cols = e_t.gather(1, cols)
            log_tail_e = e_t.scatter_(1, cols, 0.0).sum(-1).log()
            e_t.scatter_(1, cols, e_cols)
        if T == 1.0:
            e1 = e_t
        elif T == 2.0:
            e1 = torch.mul(e_t, e_t, out=buf2) if keep_q else e_t.square_()
        else:
            e1 = z.exp_()
        s1 = e1.sum(-1) if T != 1.0 else s_t
    else:
        e1 = z.exp_()
        s1 = e1.sum(-1)
    num = _Numerators(e1, s1, e_t if need_kd and (keep_q or T != 2.0) else None, s_t if need_kd else None)
    log_s1 = s1.log()
    lse1 = m + log_s1
    ce = ((m - z_label) + log_s1).sum()
    agree, correct = (pred == t.topk_ids[:, 0]).sum(), (pred == t.labels).sum()
    empty = torch.zeros(0, dtype=torch.int64, device=z.device)
    if not with_kd:
        zeros = lse1.new_zeros(len(lse1))
        stats = _RowStats(lse1, lse1, zeros, zeros[:, None], t.labels[:, None], None, empty, zeros[:0])
        return ce, z.new_zeros(()), agree, correct, stats, num
    if kind == "topk_renorm":
        logp = teacher_logprobs(t, T)
        logp_r = logp - torch.logsumexp(logp, -1, keepdim=True)
        zt = z_cols / T
        logq_r = zt - torch.logsumexp(zt, -1, keepdim=True)
        p_r = logp_r.exp()
        kd = (p_r * (logp_r - logq_r)).sum()
        beta = logq_r.exp() * p_r.sum(-1, keepdim=True) - p_r
        zeros = lse1.new_zeros(len(lse1))
        return ce, kd, agree, correct, _RowStats(lse1, lse1, zeros, beta, cols, None, empty, zeros[:0]), num
    log_s_t = s_t.log()
    lse_t = m / T + log_s_t
    logq = (z_cols - m[:, None]) / T - log_s_t[:, None]  # (c, j) log q_T at the columns
    if kind == "sampled":
        counts = t.sample_counts.float()
        target = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        kd = -(target * logq).sum()
        st = _RowStats(lse1, lse_t, target.sum(-1), -target, cols, None, empty, lse1.new_zeros(0))
        return ce, kd, agree, correct, st, num
    log_q_tail = log_tail_e - log_s_t  # (c,)
    tail_rows = torch.nonzero(~(log_q_tail > math.log(_TAIL_FLOOR)))[:, 0]
    if len(tail_rows):
        exact_logits = _logits(h[tail_rows], w, z.new_empty(len(tail_rows), z.shape[1]))
        exact_log_tail, _ = _tail_exact(exact_logits, cols[tail_rows], T)
        log_q_tail = log_q_tail.index_put((tail_rows,), exact_log_tail)
    kd, alpha, beta, coef = _tail_terms(kind, teacher_logprobs(t, T), t.tail.float().clamp(0.0, 1.0), logq,
                                        log_q_tail)
    if len(tail_rows):
        tail_coef = coef[tail_rows]
        coef = coef.index_fill(0, tail_rows, 0.0)
    else:
        tail_coef = coef[:0]
    alpha_dense = alpha + torch.where(coef == 0, 0.0, coef * torch.exp(-log_q_tail))
    at_cols = alpha[:, None] * logq.exp() + beta  # (c, k) the exact KD gradient at the top-k columns
    if cols.shape[1] > 1:  # adaptive-k rows repeat their top id (p = 0) in unused slots: scatter_ below
        dup = cols[:, 1:] == cols[:, :1]  # writes one of the repeats, so give them all the top's value
        at_cols[:, 1:] = torch.where(dup, at_cols[:, :1], at_cols[:, 1:])  # no .any(): no device sync
    p1_cols = ((z_cols - m[:, None]) - log_s1[:, None]).exp()
    st = _RowStats(lse1, lse_t, alpha_dense, at_cols, cols, p1_cols, tail_rows, tail_coef)
    return ce, kd, agree, correct, st, num


def _tail_terms(kind: str, logp: Tensor, tail_p: Tensor, logq: Tensor,
                log_q_tail: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KD sum of ``topk_tail`` / ``reverse_kl`` and its gradient w.r.t. z / T as
    ``alpha * q + scatter(beta) + coef * (q / Q on the non-top-k rows)``. Shapes (c, k) and (c,)."""
    q_k = logq.exp()
    if kind == "topk_tail":
        p = logp.exp()
        kd = (p * (logp - logq)).sum() + (torch.xlogy(tail_p, tail_p) - tail_p * log_q_tail).sum()
        return kd, p.sum(-1) + tail_p, -p, -tail_p
    if kind == "reverse_kl":
        q_tail = log_q_tail.exp()
        log_p_tail = tail_p.clamp_min(TINY_PROB).log()
        kd = (q_k * (logq - logp)).sum() + (q_tail * (log_q_tail - log_p_tail)).sum()
        a = q_k * (logq - logp + 1.0)
        b = q_tail * (log_q_tail - log_p_tail + 1.0)
        return kd, -(a.sum(-1) + b), a, b
    raise UserError(f"unknown KD kind {kind!r}; use one of {', '.join(KD_KINDS)}")


def _chunk_grad(h: Tensor, w: Tensor, st: _RowStats, labels: Tensor, temperature: float, g_ce: Tensor,
                g_kd: Tensor, with_kd: bool, buf: Tensor, buf2: Tensor | None) -> Tensor:
    """dL/dlogits (c, V) of one chunk for L = g_ce * CE + g_kd * KD, written into ``buf``."""
    T = temperature
    c_q = g_kd / T * st.alpha if with_kd else None  # (c,)
    if not with_kd or not bool(st.alpha.any()):
        g = _scaled_logits(h, w, 1.0, st.lse1, buf).exp_().mul_(g_ce)
    elif T == 1.0:
        g = _scaled_logits(h, w, 1.0, st.lse1, buf).exp_().mul_((g_ce + c_q)[:, None])
    elif T == 2.0:
        # p1 = q^2 * exp(2 lse_T - lse1): g = q * (g_ce * exp(2 lse_T - lse1) * q + c_q)
        q = _scaled_logits(h, w, 0.5, st.lse_t, buf2).exp_()
        g = torch.addcmul(c_q[:, None], q, (g_ce * (2 * st.lse_t - st.lse1).exp())[:, None], out=buf).mul_(q)
    else:
        q = _scaled_logits(h, w, 1.0 / T, st.lse_t, buf2)
        g = torch.mul(q, T, out=buf).add_((T * st.lse_t - st.lse1)[:, None]).exp_().mul_(g_ce)
        g.add_(q.exp_().mul_(c_q[:, None]))
    return _finish_grad(g, h, w, st, labels, T, g_ce, g_kd, with_kd)


def _grad_from_numerators(num: _Numerators, h: Tensor, w: Tensor, st: _RowStats, labels: Tensor,
                          temperature: float, g_ce: Tensor, g_kd: Tensor, with_kd: bool) -> Tensor:
    """The same dL/dlogits as ``_chunk_grad``, from forward's numerators (no second head matmul); it
    overwrites ``num.e1``."""
    T = temperature
    if num.e_t is None or not bool(st.alpha.any()):
        g = num.e1.mul_((g_ce / num.s1)[:, None])
    elif num.e_t is num.e1:
        g = num.e1.mul_(((g_ce + g_kd / T * st.alpha) / num.s1)[:, None])
    else:
        g = num.e1.mul_((g_ce / num.s1)[:, None]).addcmul_(num.e_t, (g_kd / T * st.alpha / num.s_t)[:, None])
    return _finish_grad(g, h, w, st, labels, T, g_ce, g_kd, with_kd)


def _finish_grad(g: Tensor, h: Tensor, w: Tensor, st: _RowStats, labels: Tensor, T: float, g_ce: Tensor,
                 g_kd: Tensor, with_kd: bool) -> Tensor:
    """Add the exact tail term of ``st.tail_rows``, the top-k columns and the one-hot label to the dense
    ``g_ce * p1 + g_kd / T * alpha * q`` in ``g`` (c, V)."""
    if with_kd and len(st.tail_rows):
        exact_logits = _logits(h[st.tail_rows], w, g.new_empty(len(st.tail_rows), g.shape[1]))
        _, r = _tail_exact(exact_logits, st.cols[st.tail_rows], T)
        g.index_add_(0, st.tail_rows, r.mul_((g_kd / T * st.tail_coef)[:, None]))  # (f, V)
    if with_kd and st.p1_cols is None:
        g.scatter_add_(1, st.cols, st.beta * (g_kd / T))
    elif with_kd:
        g.scatter_(1, st.cols, st.p1_cols * g_ce + st.beta * (g_kd / T))
    g.scatter_add_(1, labels[:, None], (-g_ce).expand(len(labels), 1))
    return g


def _proportional_scale(g_ce: Tensor, g_kd: Tensor, weights: tuple[float, float],
                        with_kd: bool) -> float | None:
    """s with (g_ce, g_kd) == s * weights (to float rounding), or None."""
    w_ce, w_kd = weights
    if not with_kd:
        return float(g_ce) / w_ce if w_ce else None
    g_ce, g_kd = float(g_ce), float(g_kd)
    if abs(g_ce * w_kd - g_kd * w_ce) > 1e-6 * max(abs(g_ce * w_kd), abs(g_kd * w_ce)):
        return None
    return g_ce / w_ce if w_ce else g_kd / w_kd


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: DistillTargets, kind: str, temperature: float,
                chunk_size: int, with_kd: bool, grad_weights: tuple[float, float] | None,
                pred_shift: Tensor | None):
        n, vocab = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ahead = grad_weights is not None and (need_h or need_w)
        w = weight.detach().to(hidden.dtype)
        c = min(chunk_size, max(n, 1))
        keep_q = ahead and temperature == 2.0
        two = with_kd and kind != "topk_renorm" and (temperature not in (1.0, 2.0) or keep_q)
        buf = torch.empty(c, vocab, dtype=torch.float32, device=hidden.device)
        buf2 = torch.empty_like(buf) if two else None
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        agree = torch.zeros((), dtype=torch.int64, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        stats = []
        grad_h = torch.empty_like(hidden) if ahead and need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ahead and need_w else None
        if ahead:
            w_ce, w_kd = (torch.tensor(float(x), device=hidden.device) for x in grad_weights)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for a in range(0, n, chunk_size):
                b = min(a + chunk_size, n)
                h = hidden[a:b].detach()
                rows = targets.rows(a, b)
                ce, kd, ag, co, st, num = _chunk_forward(h, w, rows, kind, temperature, with_kd, buf[: b - a],
                                                         None if buf2 is None else buf2[: b - a], keep_q,
                                                         pred_shift)
                ce_total += ce
                kd_total += kd
                agree += ag
                correct += co
                stats.append(st)
                if ahead:
                    g = _grad_from_numerators(num, h, w, st, rows.labels, temperature, w_ce, w_kd, with_kd)
                    _head_grads(g, h, w, grad_h, grad_w, a, b)
        ctx.save_for_backward(hidden, weight)
        ctx.stats, ctx.labels, ctx.temperature, ctx.chunk_size, ctx.with_kd = (
            stats, targets.labels, temperature, chunk_size, with_kd)
        ctx.ahead = (grad_weights, grad_h, grad_w) if ahead else None
        ctx.mark_non_differentiable(agree, correct)
        return ce_total, kd_total, agree, correct

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_kd: Tensor, _grad_agree: Tensor, _grad_correct: Tensor):
        hidden, weight = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.ahead is not None:
            weights, grad_h, grad_w = ctx.ahead
            ctx.ahead = None
            scale = _proportional_scale(grad_ce, grad_kd, weights, ctx.with_kd)
            if scale is not None:
                grad_h = grad_h.mul_(scale) if need_h else None
                grad_w = grad_w.mul_(scale).to(weight.dtype) if need_w else None
                return grad_h, grad_w, None, None, None, None, None, None, None
            del grad_h, grad_w
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        n, vocab = hidden.shape[0], weight.shape[0]
        w = weight.detach().to(hidden.dtype)
        c = min(ctx.chunk_size, max(n, 1))
        two = ctx.with_kd and ctx.temperature != 1.0
        buf = torch.empty(c, vocab, dtype=torch.float32, device=hidden.device)
        buf2 = torch.empty_like(buf) if two else None
        g_ce, g_kd = grad_ce.float(), grad_kd.float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for i, a in enumerate(range(0, n, ctx.chunk_size)):
                b = min(a + ctx.chunk_size, n)
                h = hidden[a:b].detach()
                g = _chunk_grad(h, w, ctx.stats[i], ctx.labels[a:b], ctx.temperature, g_ce, g_kd, ctx.with_kd,
                                buf[: b - a], None if buf2 is None else buf2[: b - a])  # (c, V)
                _head_grads(g, h, w, grad_h, grad_w, a, b)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _head_grads(g: Tensor, h: Tensor, w: Tensor, grad_h: Tensor | None, grad_w: Tensor | None, a: int,
                b: int) -> None:
    """grad_h[a:b] = g @ w and grad_w += g.T @ h for one chunk's dL/dlogits g (c, V), in h's dtype."""
    g = g.to(h.dtype)
    if grad_h is not None:
        torch.mm(g, w, out=grad_h[a:b])
    if grad_w is not None:
        if g.dtype == torch.float32:
            grad_w.addmm_(g.t(), h)
        else:
            grad_w.add_(g.t() @ h)


def chunked_distill_loss(hidden: Tensor, head_weight: Tensor, targets: DistillTargets, *,
                         kind: str = "topk_tail", temperature: float = 2.0, chunk_size: int = 1024,
                         with_kd: bool = True, grad_weights: tuple[float, float] | None = None,
                         pred_shift: Tensor | None = None) -> LossSums:
    """CE and KD sums for hidden states (N, d) under the head ``head_weight`` (V, d), chunk by chunk.

    Peak extra memory is one or two (chunk_size, V) fp32 buffers in forward and in backward (each chunk's
    logits are recomputed there) plus the fp32 (V, d) head gradient. ``with_kd=False`` skips the KD term
    (alpha == 1, or a cache without what ``kind`` needs is irrelevant); its sum is then 0. Value and
    gradients equal ``distill_loss_sums`` on the full logits ``hidden @ head_weight.T``.

    ``grad_weights=(w_ce, w_kd)``: the loss that will be backpropagated weighs CE and KD in this ratio, e.g.
    ``grad_weights_for(alpha, tau)``, the weights ``combine_loss`` applies (any common factor: normaliser,
    world size, loss scale). Forward then also computes both gradients from the chunk it already holds, and
    backward only scales them: one head matmul per chunk fewer, the (N, d) and fp32 (V, d) gradients held
    from forward to backward. A backward whose weights are not in that ratio recomputes as without it (same
    result).

    ``pred_shift`` (V,): subtracted from the logits before the argmax of the two metric counts only (a head
    row standing for several ids carries their count in its logit, not in its argmax; see
    ``student.any_student``).
    """
    if hidden.ndim != 2 or head_weight.ndim != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"expected hidden (N, d) and head_weight (V, d); got {tuple(hidden.shape)} and "
                         f"{tuple(head_weight.shape)}")
    if len(targets) != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {len(targets)} target rows")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if grad_weights is not None and (len(grad_weights) != 2 or not any(grad_weights)):
        raise ValueError(f"grad_weights must be (w_ce, w_kd), not both 0 (got {grad_weights})")
    weights = None if grad_weights is None else (float(grad_weights[0]), float(grad_weights[1]))
    ce, kd, agree, correct = _ChunkedDistill.apply(hidden, head_weight, targets, kind, float(temperature),
                                                   int(chunk_size), bool(with_kd), weights, pred_shift)
    return LossSums(ce=ce, kd=kd, num_rows=hidden.shape[0], top1_agree=agree, label_correct=correct)


def loss_fn_for(cfg: LossConfig) -> Callable[[Tensor, Tensor, DistillTargets], LossSums]:
    """The chunked loss with ``cfg`` bound (KD skipped when alpha == 1), gradients computed in forward for
    ``combine_loss`` with the same alpha and temperature (``grad_weights_for``)."""

    def fn(hidden: Tensor, head_weight: Tensor, targets: DistillTargets) -> LossSums:
        return chunked_distill_loss(hidden, head_weight, targets, kind=cfg.kind, temperature=cfg.temperature,
                                    chunk_size=cfg.chunk_size, with_kd=cfg.alpha < 1.0,
                                    grad_weights=grad_weights_for(cfg.alpha, cfg.temperature))

    return fn
