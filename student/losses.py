"""Distillation losses on sparse teacher targets: pure functions, fp32 inside, sums (never means).

The training objective over one optimizer step (the whole gradient-accumulation window, all ranks) is

    loss = (alpha * CE_sum + (1 - alpha) * tau^2 * KD_sum) / num_supervised_tokens_in_window

Every function here returns SUMS over supervised positions; `combine_loss` applies the weights and divides by
the caller's normaliser, so splitting the same tokens across micro-batches or ranks gives the same total loss.

Teacher side (from the cache, see docs/cache-spec.md): at temperature T = temperatures[i],
``log p_T(id) = topk_logprobs / T + topk_shift[:, i]`` on the top-k ids and ``tail_mass[:, i]`` elsewhere.
Student side: ``log_softmax(logits / T)``. CE against the labels always uses T = 1.

KD kinds (``KD_KINDS``):
- ``topk_tail``: KL(teacher || student) over the k teacher ids plus one bucket with all the remaining mass.
- ``topk_renorm``: KL between the two top-k distributions, each renormalised over the k ids.
- ``sampled``: cross-entropy against Random-Sampling KD targets ``counts / N`` on the full student softmax.
  The cached draws come from the teacher at T = 1, where the estimator is unbiased (its expectation is the
  CE against the full teacher distribution). At T != 1 the same T = 1 targets are used against the student
  at temperature T: a biased, softer-student variant, documented rather than hidden.
- ``reverse_kl``: KL(student || teacher) over the k ids plus the tail bucket.

``chunked_distill_loss`` computes the head and the loss in chunks of positions and recomputes each chunk in
backward, so the (positions x vocab) logits never exist whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from cache.util import UserError

KD_KINDS = ("topk_tail", "topk_renorm", "sampled", "reverse_kl")

# Fill value for "no logit here": finite so that an empty tail (k == vocab) gives a finite, zero-weighted
# term instead of inf * 0 = nan in the value or the gradient.
_NEG = -1e30
# Floor for a teacher tail probability inside a log (reverse KL), where the teacher says "exactly 0".
_TINY = 1e-30


@dataclass(frozen=True)
class LossConfig:
    """How to weigh hard labels against the teacher. ``temperature`` is tau (student and teacher)."""

    kind: str = "topk_tail"
    alpha: float = 0.5
    temperature: float = 2.0
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.kind not in KD_KINDS:
            raise UserError(f"unknown KD kind {self.kind!r}; use one of {', '.join(KD_KINDS)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1] (got {self.alpha}); 1 is labels only, 0 teacher only")
        if not self.temperature > 0:
            raise UserError(f"temperature must be > 0 (got {self.temperature})")
        if self.chunk_size < 1:
            raise UserError(f"chunk_size must be >= 1 (got {self.chunk_size})")


@dataclass(frozen=True)
class DistillTargets:
    """Per-row targets for N supervised positions, the teacher side already at one temperature.

    Shapes: labels (N,) int64; topk_ids (N, k) int64; topk_logprobs (N, k) (T = 1, any float dtype);
    shift (N,) and tail (N,) float32 for the chosen temperature; sample_ids (N, S) int64 and
    sample_counts (N, S) float32 padded with count 0 (or both None when the cache has no samples).
    """

    labels: Tensor
    topk_ids: Tensor
    topk_logprobs: Tensor
    shift: Tensor
    tail: Tensor
    sample_ids: Tensor | None = None
    sample_counts: Tensor | None = None

    @classmethod
    def from_batch(cls, batch, temp_index: int) -> DistillTargets:
        """Select temperature column ``temp_index`` (``reader.temperature_index(T)``) of a collated batch."""
        return cls(
            labels=batch.labels,
            topk_ids=batch.topk_ids,
            topk_logprobs=batch.topk_logprobs,
            shift=batch.topk_shift[:, temp_index],
            tail=batch.tail_mass[:, temp_index],
            sample_ids=batch.sample_ids,
            sample_counts=batch.sample_counts,
        )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def map_ids(self, mapper: Callable[[Tensor], Tensor]) -> DistillTargets:
        """Token ids -> head rows (e.g. ``model.map_to_compact`` of a student with a compacted vocabulary,
        which returns -1 for ids it lacks). UserError if a label, top-k or sampled id has no row."""
        labels, topk_ids = mapper(self.labels), mapper(self.topk_ids)
        sample_ids = None
        lacking = bool((labels < 0).any() or (topk_ids < 0).any())
        if self.sample_ids is not None:
            real = self.sample_counts > 0
            sample_ids = torch.where(real, mapper(self.sample_ids), torch.zeros_like(self.sample_ids))
            lacking = lacking or bool((sample_ids < 0).any())
        if lacking:
            raise UserError("the cache holds token ids that the student's compacted vocabulary lacks; build "
                            "the vocab_map from this cache (student.modeling.compact_ids_from_cache)")
        return replace(self, labels=labels, topk_ids=topk_ids, sample_ids=sample_ids)

    def rows(self, start: int, stop: int) -> DistillTargets:
        sliced = {}
        for f in fields(self):
            value = getattr(self, f.name)
            sliced[f.name] = None if value is None else value[start:stop]
        return replace(self, **sliced)


@dataclass
class LossSums:
    """Sums over the rows of one call. ``ce`` and ``kd`` carry gradients; the metrics do not."""

    ce: Tensor
    kd: Tensor
    num_rows: int
    top1_agree: Tensor  # how many rows have student argmax == teacher top-1 (int64 scalar)
    label_correct: Tensor  # how many rows have student argmax == label (int64 scalar)


def teacher_logprobs(targets: DistillTargets, temperature: float) -> Tensor:
    """log p_T on the top-k ids, (N, k) float32."""
    return targets.topk_logprobs.float() / temperature + targets.shift.float()[:, None]


def _student_tail_logprob(logq: Tensor, ids: Tensor) -> Tensor:
    """log(1 - sum_{ids} q) per row as an LSE over the non-top-k entries: exact, no cancellation. (n,)"""
    rest = logq.scatter(1, ids, _NEG)  # (n, V)
    return torch.logsumexp(rest, dim=-1)


def kd_sum(logits: Tensor, targets: DistillTargets, kind: str, temperature: float) -> Tensor:
    """KD term summed over rows. ``logits`` (n, V) are the student's raw logits at T = 1."""
    logq = F.log_softmax(logits.float() / temperature, dim=-1)  # (n, V)
    ids = targets.topk_ids
    if kind == "sampled":
        if targets.sample_ids is None:
            raise UserError("KD kind 'sampled' needs a cache written with samples; rebuild it with "
                            "--samples N or choose another --kd")
        counts = targets.sample_counts.float()  # (n, S)
        target = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        return -(target * logq.gather(1, targets.sample_ids)).sum()
    logp = teacher_logprobs(targets, temperature)  # (n, k)
    logq_k = logq.gather(1, ids)  # (n, k)
    if kind == "topk_renorm":
        logp_r = logp - torch.logsumexp(logp, -1, keepdim=True)
        logq_r = logq_k - torch.logsumexp(logq_k, -1, keepdim=True)
        return (logp_r.exp() * (logp_r - logq_r)).sum()
    tail_p = targets.tail.float().clamp(0.0, 1.0)  # (n,)
    logq_tail = _student_tail_logprob(logq, ids)  # (n,)
    if kind == "topk_tail":
        head = (logp.exp() * (logp - logq_k)).sum()
        return head + (torch.xlogy(tail_p, tail_p) - tail_p * logq_tail).sum()
    if kind == "reverse_kl":
        head = (logq_k.exp() * (logq_k - logp)).sum()
        return head + (logq_tail.exp() * (logq_tail - tail_p.clamp_min(_TINY).log())).sum()
    raise UserError(f"unknown KD kind {kind!r}; use one of {', '.join(KD_KINDS)}")


def distill_loss_sums(logits: Tensor, targets: DistillTargets, kind: str = "topk_tail",
                      temperature: float = 2.0) -> LossSums:
    """Unchunked reference: CE sum (T = 1), KD sum (at ``temperature``) and top-1 agreement, logits (N, V)."""
    ce = F.cross_entropy(logits.float(), targets.labels, reduction="sum")
    kd = kd_sum(logits, targets, kind, temperature)
    pred = logits.argmax(-1)
    return LossSums(ce=ce, kd=kd, num_rows=len(targets), top1_agree=(pred == targets.topk_ids[:, 0]).sum(),
                    label_correct=(pred == targets.labels).sum())


def combine_loss(sums: LossSums, *, alpha: float, temperature: float,
                 normalizer: float | int | Tensor) -> Tensor:
    """``(alpha * CE + (1 - alpha) * tau^2 * KD) / normalizer``.

    ``normalizer`` is the number of supervised tokens in the whole accumulation window (all micro-batches,
    all ranks), the same for every micro-batch of that window.
    """
    return (alpha * sums.ce + (1.0 - alpha) * temperature**2 * sums.kd) / normalizer


def _chunk_terms(h: Tensor, w: Tensor, targets: DistillTargets, kind: str, temperature: float,
                 kd_weight_nonzero: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = F.linear(h, w.to(h.dtype)).float()  # (c, V)
        ce = F.cross_entropy(logits, targets.labels, reduction="sum")
        kd = kd_sum(logits, targets, kind, temperature) if kd_weight_nonzero else logits.new_zeros(())
        pred = logits.detach().argmax(-1)
    return ce, kd, (pred == targets.topk_ids[:, 0]).sum(), (pred == targets.labels).sum()


class _ChunkedDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: DistillTargets, kind: str, temperature: float,
                chunk_size: int, with_kd: bool):
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        agree = torch.zeros((), dtype=torch.int64, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        for a in range(0, hidden.shape[0], chunk_size):
            b = min(a + chunk_size, hidden.shape[0])
            ce, kd, ag, co = _chunk_terms(hidden[a:b], weight, targets.rows(a, b), kind, temperature, with_kd)
            ce_total += ce
            kd_total += kd
            agree += ag
            correct += co
        ctx.save_for_backward(hidden, weight)
        ctx.targets, ctx.kind, ctx.temperature, ctx.chunk_size, ctx.with_kd = (
            targets, kind, temperature, chunk_size, with_kd)
        ctx.mark_non_differentiable(agree, correct)
        return ce_total, kd_total, agree, correct

    @staticmethod
    def backward(ctx, grad_ce: Tensor, grad_kd: Tensor, _grad_agree: Tensor, _grad_correct: Tensor):
        hidden, weight = ctx.saved_tensors
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        w = weight.detach().requires_grad_(ctx.needs_input_grad[1])
        for a in range(0, hidden.shape[0], ctx.chunk_size):
            b = min(a + ctx.chunk_size, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[a:b].detach().requires_grad_(ctx.needs_input_grad[0])
                rows = ctx.targets.rows(a, b)
                ce, kd, _, _ = _chunk_terms(h, w, rows, ctx.kind, ctx.temperature, ctx.with_kd)
                total = ce * grad_ce + (kd * grad_kd if ctx.with_kd else 0.0)
                pairs = ((h, ctx.needs_input_grad[0]), (w, ctx.needs_input_grad[1]))
                inputs = [x for x, need in pairs if need]
                grads = torch.autograd.grad(total, inputs)
            grads = list(grads)
            if ctx.needs_input_grad[0]:
                grad_h[a:b] = grads.pop(0)
            if ctx.needs_input_grad[1]:
                grad_w += grads.pop(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_distill_loss(hidden: Tensor, head_weight: Tensor, targets: DistillTargets, *,
                         kind: str = "topk_tail", temperature: float = 2.0, chunk_size: int = 1024,
                         with_kd: bool = True) -> LossSums:
    """CE and KD sums for hidden states (N, d) under the head ``head_weight`` (V, d), chunk by chunk.

    Peak extra memory is a few (chunk_size, V) fp32 buffers in forward and in backward (each chunk's logits
    are recomputed there). ``with_kd=False`` skips the KD term (alpha == 1, or a cache without what ``kind``
    needs is irrelevant); its sum is then 0. Value and gradients equal ``distill_loss_sums`` on the full
    logits ``hidden @ head_weight.T``.
    """
    if hidden.ndim != 2 or head_weight.ndim != 2 or hidden.shape[1] != head_weight.shape[1]:
        raise ValueError(f"expected hidden (N, d) and head_weight (V, d); got {tuple(hidden.shape)} and "
                         f"{tuple(head_weight.shape)}")
    if len(targets) != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {len(targets)} target rows")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    ce, kd, agree, correct = _ChunkedDistill.apply(hidden, head_weight, targets, kind, float(temperature),
                                          int(chunk_size), bool(with_kd))
    return LossSums(ce=ce, kd=kd, num_rows=hidden.shape[0], top1_agree=agree, label_correct=correct)


def loss_fn_for(cfg: LossConfig) -> Callable[[Tensor, Tensor, DistillTargets], LossSums]:
    """The chunked loss with ``cfg`` bound (KD skipped when alpha == 1)."""

    def fn(hidden: Tensor, head_weight: Tensor, targets: DistillTargets) -> LossSums:
        return chunked_distill_loss(hidden, head_weight, targets, kind=cfg.kind, temperature=cfg.temperature,
                                    chunk_size=cfg.chunk_size, with_kd=cfg.alpha < 1.0)

    return fn
