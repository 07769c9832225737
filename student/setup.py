"""Stage two's run, built before the first step (``setup``): the device and precision, the run lock on the
output folder, where the run starts (``student.sources.resolve_start``: fresh, ``--init-from`` or
``--resume``), the student wrapped for the step (``DistillForward``, DDP, ``torch.compile``), the optimizer
and the data. ``Run`` holds all of it and ``TrainState`` the counters a checkpoint saves.
"""

from __future__ import annotations

import math
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from cache.device import Dist, resolve_device
from cache.interrupt import ignore_stop_signals_in_worker
from cache.util import FolderLock, Locked, UserError, lock_run_folder
from student.checkpoint import recover_folders, set_rng_state
from student.chunked_loss import chunked_distill_loss
from student.data import Collator, TokenBudgetBatchSampler, gather_rows, make_dataloader
from student.losses import grad_weights_for
from student.modeling import CausalSTFT
from student.schedule import OptimizerConfig, build_optimizer
from student.sources import resolve_start
from student.train_config import TrainConfig
from student.train_data import TrainData


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_consumed: int = 0  # global steps done in ``epoch``
    tokens: int = 0  # real (non-padding) tokens seen, all ranks
    supervised_tokens: int = 0
    best_val_ce: float | None = None  # --keep-best: the lowest validation CE so far and its step
    best_step: int | None = None


@dataclass
class Run:
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    data: TrainData
    model: nn.Module  # the raw student: checkpoints are written from it, never from a wrapper
    forward: nn.Module  # DistillForward, possibly under DDP and torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: Any
    loader: torch.utils.data.DataLoader
    micro_per_step: int  # micro-batches per optimizer step over all ranks
    share_kernels: bool  # one STFT kernel per layer per optimizer step (model.shared_kernels())
    shared_params: list[nn.Parameter]  # STFT projection weights, reduced by hand under DDP when shared
    state: TrainState = field(default_factory=TrainState)
    last_checkpoint_step: int | None = None
    lock: FolderLock | None = None  # rank 0: the run lock on ``cfg.out``, held until ``close``

    def close(self) -> None:
        """End the DataLoader workers and release the run lock on ``cfg.out`` (``train_student`` does at its
        end; the kernel on a crash). The workers ignore SIGTERM (``make_loader``), so they are stopped here
        rather than left to multiprocessing's exit handler, which would terminate them with it and wait."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            self.loader._iterator = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (fp16 + GradScaler where bf16 is unsupported), fp32 on CPU."""
    cuda = device.type == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and not cuda:
        raise UserError("--precision fp16 needs CUDA (it uses a GradScaler); on CPU use fp32 or bf16")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --precision fp16 or fp32")
    return precision


def micro_batches_per_step(cfg: TrainConfig, world_size: int) -> int:
    if cfg.step_tokens is not None:
        m = math.ceil(cfg.step_tokens / cfg.batch_tokens)
        return math.ceil(m / world_size) * world_size
    return (cfg.accum or 1) * world_size


def make_loader(dataset, sampler, pad_id: int, num_workers: int, device: torch.device):
    # A private generator: creating an iterator draws its worker base seed from it, not from the global RNG
    # that dropout uses, so evaluations and resumes leave the training randomness untouched. Workers persist
    # across epochs (the batch sampler runs in the main process, so set_epoch still applies). Workers ignore
    # SIGINT/SIGTERM: the trainer stops at a step boundary and they end with it.
    loader = make_dataloader(dataset, sampler, Collator(pad_id=pad_id), num_workers=num_workers,
                             device=device, persistent_workers=num_workers > 0,
                             generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        loader.worker_init_fn = partial(ignore_stop_signals_in_worker, loader.worker_init_fn)
    return loader


def lock_out(cfg: TrainConfig, dist: Dist) -> FolderLock | None:
    """Rank 0 locks ``cfg.out`` (``cache.util.lock_run_folder``) for the run; every rank raises the same
    one-line refusal when another process holds it. None on the other ranks."""
    lock, refusal = None, None
    if dist.rank == 0:
        try:
            lock = lock_run_folder(cfg.out, "train-student")
        except Locked as e:
            refusal = (True, str(e))
        except OSError as e:
            refusal = (False, f"cannot lock --out {cfg.out} ({e.strerror or e}); choose a folder you can "
                              "write")
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise (Locked if refusal[0] else UserError)(refusal[1])
    return lock


def setup(cfg: TrainConfig, dist: Dist | None = None) -> Run:
    """Lock ``cfg.out``, open and check the caches, build (or reload, with ``resume``) the student, optimizer
    and data. The lock is the returned run's (``Run.close`` releases it); a refused setup releases it and
    removes an output folder it created."""
    dist = dist or Dist.from_env()
    device = resolve_device(cfg.device, dist)
    precision = resolve_precision(cfg.precision, device)
    fresh = not cfg.out.exists()
    lock = lock_out(cfg, dist)
    try:
        run = _setup_locked(cfg, dist, device, precision)
    except BaseException:
        _unlock_refused(cfg, lock, fresh)
        raise
    run.lock = lock
    return run


def _setup_locked(cfg: TrainConfig, dist: Dist, device: torch.device, precision: str) -> Run:
    _recover_folders(cfg, dist)
    cfg, data, model, trainer_state = resolve_start(cfg)  # fresh, --init-from or --resume
    _prepare_model(model, device, cfg.grad_checkpointing)
    _seed_everything(cfg.seed * 1000 + dist.rank + 1)
    forward, shared = _wrap_forward(model, cfg, dist, device)
    optimizer = build_optimizer(model, cfg.schedule_config(), OptimizerConfig(weight_decay=cfg.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    micro = micro_batches_per_step(cfg, dist.world_size)
    sampler = _train_sampler(cfg, data, dist, micro)
    loader = make_loader(data.train, sampler, data.pad_id, cfg.num_workers, device)
    run = Run(cfg=cfg, dist=dist, device=device, precision=precision, data=data, model=model, forward=forward,
              optimizer=optimizer, scaler=scaler, sampler=sampler, loader=loader, micro_per_step=micro,
              share_kernels=not cfg.compile, shared_params=shared)
    if trainer_state is not None:
        _load_trainer_state(run, trainer_state)
    return run


def _unlock_refused(cfg: TrainConfig, lock: FolderLock | None, fresh: bool) -> None:
    """A refused setup: release the lock, and remove the output folder it created (only when empty)."""
    if lock is not None:
        lock.release(remove=fresh)
        if fresh:
            try:
                cfg.out.rmdir()  # only when empty: nothing else was written yet
            except OSError:
                pass


def _recover_folders(cfg: TrainConfig, dist: Dist) -> None:
    """A crash between the two renames of a folder replace leaves it hidden: rank 0 puts it back."""
    if dist.rank == 0:
        for note in recover_folders(cfg.out):
            print(f"train-student: {note}", file=sys.stderr)
    dist.barrier()


def _prepare_model(model: nn.Module, device: torch.device, grad_checkpointing: bool) -> None:
    model.to(device).train()
    if grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class DistillForward(nn.Module):
    """The student's hidden states and the chunked head + loss: the module DDP and ``torch.compile`` wrap.

    Returns ``(ce_sum, kd_sum, top1_agree, label_correct)`` over the batch's supervised rows."""

    def __init__(self, model: nn.Module, kind: str, temperature: float, chunk_size: int, with_kd: bool,
                 grad_weights: tuple[float, float] | None = None):
        super().__init__()
        self.model = model
        self.kind, self.temperature, self.chunk_size, self.with_kd = kind, temperature, chunk_size, with_kd
        # How the loss will weigh (CE, KD): lets the loss form its head gradients in the forward pass
        # (one head matmul per chunk fewer); any other weighting falls back to recomputation.
        self.grad_weights = grad_weights

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pred_pos: Tensor, targets) -> tuple:
        hidden = self.model.hidden_states(input_ids, attention_mask)  # (B, Lmax, d)
        rows = gather_rows(hidden, pred_pos)  # (N, d)
        head = self.model.get_output_embeddings().weight  # (V, d)
        tempered = getattr(self.model, "tempered_head", None)
        kd_head = (tempered(self.temperature) if tempered and self.with_kd and self.kind != "topk_renorm"
                   else None)
        shift = getattr(self.model, "argmax_shift", None)
        if kd_head is None:
            s = chunked_distill_loss(rows, head, targets, kind=self.kind, temperature=self.temperature,
                                     chunk_size=self.chunk_size, with_kd=self.with_kd,
                                     grad_weights=self.grad_weights, pred_shift=shift)
            return s.ce, s.kd, s.top1_agree, s.label_correct
        # a compacted transformers student at T != 1: its KD softmax needs another head (any_student.py)
        w_ce, w_kd = self.grad_weights or (0.0, 0.0)
        ce = chunked_distill_loss(rows, head, targets, kind=self.kind, chunk_size=self.chunk_size,
                                  with_kd=False, grad_weights=(w_ce, 0.0) if w_ce else None,
                                  pred_shift=shift)
        kd = chunked_distill_loss(rows, kd_head.weight, targets, kind=self.kind, temperature=self.temperature,
                                  chunk_size=self.chunk_size, grad_weights=(0.0, w_kd) if w_kd else None)
        return ce.ce, kd.kd, ce.top1_agree, ce.label_correct


def _wrap_forward(model: nn.Module, cfg: TrainConfig, dist: Dist,
                  device: torch.device) -> tuple[nn.Module, list[nn.Parameter]]:
    """``DistillForward`` under DDP and ``torch.compile`` as configured, and the STFT projection weights
    that DDP leaves to ``accumulate`` (one kernel per layer per step; none with ``--compile``)."""
    loss_cfg = cfg.loss_config()
    fwd: nn.Module = DistillForward(model, loss_cfg.kind, loss_cfg.temperature, loss_cfg.chunk_size,
                                    with_kd=loss_cfg.alpha < 1.0,
                                    grad_weights=grad_weights_for(loss_cfg.alpha, loss_cfg.temperature))
    # Compiled graphs would guard on the per-step kernel tensors and recompile every step, so with --compile
    # each micro-batch derives its kernels inside the graph instead.
    share = not cfg.compile
    shared = [m.projection.weight for m in model.modules() if isinstance(m, CausalSTFT)] if share else []
    if dist.distributed:
        ids = {id(p) for p in shared}
        ignore = [n for n, p in fwd.named_parameters() if id(p) in ids]
        DDP._set_params_and_buffers_to_ignore_for_model(fwd, ignore)
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)
    return fwd, shared


def _train_sampler(cfg: TrainConfig, data: TrainData, dist: Dist, micro: int) -> TokenBudgetBatchSampler:
    sampler = TokenBudgetBatchSampler.from_dataset(data.train, cfg.batch_tokens, seed=cfg.seed,
                                                   micro_batches_per_step=micro, world_size=dist.world_size,
                                                   rank=dist.rank)
    if sampler.num_steps(0) == 0:
        raise UserError(f"the cache holds too few sequences ({len(data.train)}) for {dist.world_size} ranks")
    return sampler


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _load_trainer_state(run: Run, saved: dict[str, Any]) -> None:
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = TrainState(**saved["state"])
    run.last_checkpoint_step = run.state.step
    states = saved["rng"]
    if run.dist.rank < len(states):
        set_rng_state(states[run.dist.rank])
