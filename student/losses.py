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

The fused, chunked head + loss that training runs is ``student.chunked_loss.chunked_distill_loss``; the
functions here are its definitions and its reference (``distill_loss_sums`` on full logits).
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
NEG_LOGIT = -1e30
# Floor for a teacher tail probability inside a log (reverse KL), where the teacher says "exactly 0".
TINY_PROB = 1e-30


@dataclass(frozen=True)
class LossConfig:
    """How to weigh hard labels against the teacher. ``temperature`` is tau (student and teacher)."""

    kind: str = "topk_tail"
    alpha: float = 0.2
    temperature: float = 1.0
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
    rest = logq.scatter(1, ids, NEG_LOGIT)  # (n, V)
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
        return head + (logq_tail.exp() * (logq_tail - tail_p.clamp_min(TINY_PROB).log())).sum()
    raise UserError(f"unknown KD kind {kind!r}; use one of {', '.join(KD_KINDS)}")


def distill_loss_sums(logits: Tensor, targets: DistillTargets, kind: str = "topk_tail",
                      temperature: float = 2.0) -> LossSums:
    """Unchunked reference: CE sum (T = 1), KD sum (at ``temperature``) and top-1 agreement, logits (N, V)."""
    ce = F.cross_entropy(logits.float(), targets.labels, reduction="sum")
    kd = kd_sum(logits, targets, kind, temperature)
    pred = logits.argmax(-1)
    return LossSums(ce=ce, kd=kd, num_rows=len(targets), top1_agree=(pred == targets.topk_ids[:, 0]).sum(),
                    label_correct=(pred == targets.labels).sum())


def grad_weights_for(alpha: float, temperature: float) -> tuple[float, float]:
    """The loss's (CE, KD) weights ``(alpha, (1 - alpha) * tau^2)``: ``combine_loss`` applies them, and
    ``chunked_distill_loss(..., grad_weights=...)`` forms its head gradients in this ratio."""
    return alpha, (1.0 - alpha) * temperature**2


def combine_loss(sums, *, alpha: float, temperature: float, normalizer: float | int | Tensor):
    """``(alpha * CE + (1 - alpha) * tau^2 * KD) / normalizer``: the one loss formula, of any ``sums`` with
    ``.ce`` and ``.kd`` (a micro-batch's ``LossSums`` tensors, or a step's ``student.step.StepSums``
    floats, where training logs it).

    ``normalizer`` is the number of supervised tokens in the whole accumulation window (all micro-batches,
    all ranks), the same for every micro-batch of that window.
    """
    w_ce, w_kd = grad_weights_for(alpha, temperature)
    return (w_ce * sums.ce + w_kd * sums.kd) / normalizer
