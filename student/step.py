"""One optimizer step of stage two: forward and backward over the step's micro-batches (``accumulate``), then
the update (``optimizer_step``). One step is the whole accumulation window over all ranks
(``TokenBudgetBatchSampler.steps()``), and its loss is ``student.losses.combine_loss``:

    loss = (alpha * CE_sum + (1 - alpha) * tau^2 * KD_sum) / step.num_supervised

The losses are sums, so micro-batches and ranks can split a step any way; under DDP, which averages
gradients, each rank's loss is multiplied by ``world_size``. Each layer's STFT kernel is computed once per
optimizer step (``model.shared_kernels()``); its gradient reaches the projection weight when that block
exits, outside DDP's hooks, so those weights are excluded from DDP and all-reduced here. ``accumulate``
returns the step's sums by name (``StepSums``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from student.losses import DistillTargets, LossSums, combine_loss
from student.schedule import lr_at, set_lr
from student.setup import Run


@dataclass
class TrainHooks:
    """Callbacks for tests and tools; not part of the config, so they never enter a checkpoint.

    ``loss(step, micro_loss) -> loss`` replaces a micro-batch loss before backward; ``micro_batch(step,
    batch)`` sees every loaded micro-batch; ``after_step(step)`` runs after step ``step`` (1-based count) and
    its evaluation and checkpoint; ``ready()`` runs once setup has accepted the output folder, before the
    first step (the command writes ``config.yaml`` there)."""

    loss: Callable[[int, Tensor], Tensor] | None = None
    micro_batch: Callable[[int, Any], None] | None = None
    after_step: Callable[[int], None] | None = None
    ready: Callable[[], None] | None = None


class StepSums(NamedTuple):
    """One optimizer step's sums over its micro-batches and all ranks (float64), or several steps' added up
    with ``+`` (not tuple concatenation): divide by ``rows`` for means per supervised token."""

    ce: float = 0.0  # CE against the labels, summed over supervised tokens
    kd: float = 0.0  # KD term at the run's temperature (0 with alpha == 1)
    top1_agree: float = 0.0  # supervised tokens where the student's argmax is the teacher's top-1
    label_correct: float = 0.0  # ... where it is the label
    rows: float = 0.0  # supervised tokens
    tokens: float = 0.0  # real (non-padding) tokens
    loss: float = 0.0  # the loss that was backpropagated (``combine_loss``), summed over micro-batches

    def __add__(self, other: StepSums) -> StepSums:  # type: ignore[override]
        return StepSums(*(a + b for a, b in zip(self, other)))


def targets_for(run: Run, batch, temp_index: int):
    targets = DistillTargets.from_batch(batch, temp_index)
    if getattr(run.model, "vocab_map", None) is not None or getattr(run.model.config, "vocab_map", None):
        targets = targets.map_ids(run.model.map_to_compact)
    return targets


def accumulate(run: Run, batches: Sequence, normalizer: int, hooks: TrainHooks | None = None) -> StepSums:
    """Forward and backward over one optimizer step's micro-batches (this rank's part); gradients land in
    ``.grad`` (scaled by the GradScaler under fp16). Returns the float64 sums over the whole step, all
    ranks."""
    cfg, dist = run.cfg, run.dist
    lc = cfg.loss_config()
    sums = torch.zeros(len(StepSums._fields), dtype=torch.float64, device=run.device)
    ddp = dist.distributed
    # Only the min(W, longest sequence) kernel taps can reach this step's tokens: build just those.
    max_len = max(int(b.input_ids.shape[1]) for b in batches)
    with run.model.shared_kernels(max_len) if run.share_kernels else nullcontext():
        for i, batch in enumerate(batches):
            sync = nullcontext() if (not ddp or i == len(batches) - 1) else _no_sync(run.forward)
            with sync:
                with run.autocast():
                    targets = targets_for(run, batch, run.data.temp_index)
                    ce, kd, agree, correct = run.forward(batch.input_ids, batch.attention_mask,
                                                         batch.pred_pos, targets)
                loss = combine_loss(LossSums(ce, kd, batch.num_supervised, agree, correct), alpha=lc.alpha,
                                    temperature=lc.temperature, normalizer=normalizer) * dist.world_size
                if hooks is not None and hooks.loss is not None:
                    loss = hooks.loss(run.state.step, loss)
                run.scaler.scale(loss).backward()
            rows = torch.tensor(float(batch.num_supervised), dtype=torch.float64, device=run.device)
            part = StepSums(ce=ce.detach().double(), kd=kd.detach().double(), top1_agree=agree.double(),
                            label_correct=correct.double(), rows=rows,
                            tokens=batch.attention_mask.sum().double(),
                            loss=loss.detach().double() / dist.world_size)  # this micro-batch's, as tensors
            sums += torch.stack(part)
    if ddp:
        for p in run.shared_params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(dist.world_size)
    return StepSums(*dist.all_reduce(sums).tolist())


def _no_sync(module: nn.Module):
    inner = getattr(module, "_orig_mod", module)  # a compiled DDP module
    return inner.no_sync()


def optimizer_step(run: Run) -> float:
    """unscale -> clip -> step -> zero_grad, with the learning rate of the current step. Returns the
    gradient norm before clipping (inf/nan when the fp16 scaler skips the step)."""
    set_lr(run.optimizer, lr_at(run.state.step, run.cfg.schedule_config()))
    run.scaler.unscale_(run.optimizer)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    if run.cfg.clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)
