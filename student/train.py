"""Stage two: train the causal STFT FNet student from a teacher cache (``setup -> fit``); no teacher loaded.

One optimizer step is the whole accumulation window over all ranks (``TokenBudgetBatchSampler.steps()``):

    loss = (alpha * CE_sum + (1 - alpha) * tau^2 * KD_sum) / step.num_supervised

The losses are sums (``student.losses``), so micro-batches and ranks can split a step any way; under DDP,
which averages gradients, each rank's loss is multiplied by ``world_size``. Each layer's STFT kernel is
computed once per optimizer step (``model.shared_kernels()``); its gradient reaches the projection weight
when that block exits, outside DDP's hooks, so those weights are excluded from DDP and all-reduced here.

An output folder holds ``checkpoint-last/``, ``final/`` (``student.checkpoint``), ``metrics.jsonl`` and
``curves.png`` (``student.metrics``). ``resume`` continues from ``checkpoint-last/`` exactly: the data
position comes from the deterministic sampler, the learning rate from ``lr_at(step)``.

Read top to bottom: the run (``setup``), one optimizer step (``accumulate``, ``optimizer_step``), periodic
evaluation (``evaluate``), checkpoint calls, the loop (``fit``) and the entry point (``train_student``).
The run config is ``student.train_config``, the caches and the split ``student.train_data``.
"""

from __future__ import annotations

import datetime
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cache.device import Dist, resolve_device
from cache.interrupt import (
    Interrupted,
    StopSignals,
    command_line,
    ignore_stop_signals_in_worker,
    signal_name,
)
from cache.progress import Progress, format_duration
from cache.util import FolderLock, Locked, UserError, lock_run_folder
from student.any_student import CausalLMStudent
from student.any_student import describe as describe_causal_lm
from student.checkpoint import (
    BEST,
    CHECKPOINT,
    FINAL,
    TRAINER_STATE,
    check_resume,
    folder_problem,
    provenance,
    recover_folders,
    resume_config,
    rng_state,
    set_rng_state,
    write_folder_atomically,
    write_model_folder,
    write_trainer_state,
)
from student.chunked_loss import chunked_distill_loss
from student.data import Collator, TokenBudgetBatchSampler, gather_rows, make_dataloader
from student.losses import DistillTargets, LossSums, combine_loss, grad_weights_for
from student.metrics import METRICS, MetricsLog
from student.modeling import CausalSTFT, count_parameters
from student.reporting import open_reporters
from student.schedule import OptimizerConfig, build_optimizer, lr_at, set_lr
from student.sources import build_student, check_any_vocabulary, init_from_folder, load_any_student
from student.train_config import TrainConfig
from student.train_data import TrainData, open_training_data

__all__ = ["CHECKPOINT", "FINAL", "METRICS", "TRAINER_STATE", "TrainConfig", "TrainHooks", "TrainResult",
           "TrainingDiverged", "accumulate", "evaluate", "fit", "optimizer_step", "setup", "train_student"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing was updated with it and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    out_dir: Path
    final_metrics: dict[str, Any]
    wall_s: float


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


# ---------------------------------------------------------------------------------------------- the run


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
        end; the kernel on a crash). The workers ignore SIGTERM (``_make_loader``), so they are stopped here
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


def _make_loader(dataset, sampler, pad_id: int, num_workers: int, device: torch.device):
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
        if lock is not None:
            lock.release(remove=fresh)
            if fresh:
                try:
                    cfg.out.rmdir()  # only when empty: nothing else was written yet
                except OSError:
                    pass
        raise
    run.lock = lock
    return run


def _setup_locked(cfg: TrainConfig, dist: Dist, device: torch.device, precision: str) -> Run:
    ckpt = cfg.out / CHECKPOINT
    if dist.rank == 0:  # a crash between the two renames of a folder replace leaves it hidden: put it back
        for note in recover_folders(cfg.out):
            print(f"train-student: {note}", file=sys.stderr)
    dist.barrier()
    if cfg.resume and not (ckpt / TRAINER_STATE).is_file():
        raise UserError(f"--resume: there is no checkpoint in {ckpt}; run without --resume to start")
    if not cfg.resume and ckpt.exists():
        raise UserError(f"{cfg.out} already holds a training run ({CHECKPOINT}/); pass --resume to "
                        "continue it or choose another --out")
    if cfg.resume:
        cfg = resume_config(cfg, ckpt)  # checks the files; with --extend, the checkpoint's schedule
    data = open_training_data(cfg)
    saved = None
    if cfg.resume:
        saved = check_resume(cfg, ckpt, data)
        model = load_any_student(ckpt, "--resume")
        check_any_vocabulary(model, data)
    elif cfg.init_from is not None:
        model = init_from_folder(cfg, data)
    else:  # the FNet, or a transformers model (student.any_student.CausalLMStudent)
        model = build_student(cfg, data)
    model.to(device).train()
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _seed_everything(cfg.seed * 1000 + dist.rank + 1)

    loss_cfg = cfg.loss_config()
    fwd: nn.Module = DistillForward(model, loss_cfg.kind, loss_cfg.temperature, loss_cfg.chunk_size,
                                    with_kd=loss_cfg.alpha < 1.0,
                                    grad_weights=grad_weights_for(loss_cfg.alpha, loss_cfg.temperature))
    # Compiled graphs would guard on the per-step kernel tensors and recompile every step, so with --compile
    # each micro-batch derives its kernels inside the graph instead.
    share = not cfg.compile
    shared = [m.projection.weight for m in model.modules() if isinstance(m, CausalSTFT)] if share else []
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = {id(p) for p in shared}
        ignore = [n for n, p in fwd.named_parameters() if id(p) in ids]
        DDP._set_params_and_buffers_to_ignore_for_model(fwd, ignore)
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        fwd = torch.compile(fwd)

    optimizer = build_optimizer(model, cfg.schedule_config(), OptimizerConfig(weight_decay=cfg.weight_decay))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    micro = micro_batches_per_step(cfg, dist.world_size)
    sampler = TokenBudgetBatchSampler.from_dataset(data.train, cfg.batch_tokens, seed=cfg.seed,
                                                   micro_batches_per_step=micro, world_size=dist.world_size,
                                                   rank=dist.rank)
    if sampler.num_steps(0) == 0:
        raise UserError(f"the cache holds too few sequences ({len(data.train)}) for {dist.world_size} ranks")
    loader = _make_loader(data.train, sampler, data.pad_id, cfg.num_workers, device)
    run = Run(cfg=cfg, dist=dist, device=device, precision=precision, data=data, model=model, forward=fwd,
              optimizer=optimizer, scaler=scaler, sampler=sampler, loader=loader, micro_per_step=micro,
              share_kernels=share, shared_params=shared)
    if saved is not None:
        _load_trainer_state(run, saved)
    return run


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------- the step


def targets_for(run: Run, batch, temp_index: int):
    targets = DistillTargets.from_batch(batch, temp_index)
    if getattr(run.model, "vocab_map", None) is not None or getattr(run.model.config, "vocab_map", None):
        targets = targets.map_ids(run.model.map_to_compact)
    return targets


def accumulate(run: Run, batches: Sequence, normalizer: int, hooks: TrainHooks | None = None) -> Tensor:
    """Forward and backward over one optimizer step's micro-batches (this rank's part); gradients land in
    ``.grad`` (scaled by the GradScaler under fp16). Returns float64 sums over the whole step, all ranks:
    ``[ce, kd, top1_agree, label_correct, rows, real_tokens, loss]`` (``loss``: what was backpropagated)."""
    cfg, dist = run.cfg, run.dist
    lc = cfg.loss_config()
    sums = torch.zeros(7, dtype=torch.float64, device=run.device)
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
            sums += torch.stack([ce.detach().double(), kd.detach().double(), agree.double(), correct.double(),
                                 rows, batch.attention_mask.sum().double(),
                                 loss.detach().double() / dist.world_size])
    if ddp:
        for p in run.shared_params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(dist.world_size)
    return dist.all_reduce(sums)


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


def step_loss(sums: Sequence[float], alpha: float, temperature: float) -> float:
    ce, kd, rows = float(sums[0]), float(sums[1]), max(float(sums[4]), 1.0)
    return (alpha * ce + (1.0 - alpha) * temperature**2 * kd) / rows


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """CE on the labels, KL(teacher || student) at T = 1 over top-k + tail, and top-1 agreement with the
    teacher, per supervised token of the validation set (split across ranks, then summed)."""
    data = run.data
    if data.val is None:
        return {}
    sampler = TokenBudgetBatchSampler.from_dataset(data.val, run.cfg.batch_tokens, seed=0,
                                                   micro_batches_per_step=run.dist.world_size,
                                                   world_size=run.dist.world_size, rank=run.dist.rank)
    loader = _make_loader(data.val, sampler, data.pad_id, 0, run.device)
    with_kl = data.val_t1_index is not None
    sums = torch.zeros(5, dtype=torch.float64, device=run.device)
    was_training = run.model.training
    run.model.eval()
    try:
        for batch in loader:
            batch = batch.to(run.device)
            targets = targets_for(run, batch, data.val_t1_index or 0)
            with run.autocast():
                hidden = run.model.hidden_states(batch.input_ids, batch.attention_mask)  # (B, Lmax, d)
                s = chunked_distill_loss(gather_rows(hidden, batch.pred_pos),
                                         run.model.get_output_embeddings().weight, targets, kind="topk_tail",
                                         temperature=1.0, chunk_size=run.cfg.chunk_size, with_kd=with_kl,
                                         pred_shift=getattr(run.model, "argmax_shift", None))
            rows = torch.tensor(float(s.num_rows), dtype=torch.float64, device=run.device)
            sums += torch.stack([s.ce.double(), s.kd.double(), s.top1_agree.double(),
                                 s.label_correct.double(), rows])
    finally:
        run.model.train(was_training)
    ce, kl, agree, correct, rows = run.dist.all_reduce(sums).tolist()
    rows = max(rows, 1.0)
    out = {"val_ce": ce / rows, "val_top1_agree": agree / rows, "val_label_acc": correct / rows,
           "val_tokens": int(rows)}
    if with_kl:
        out["val_kl"] = kl / rows
    return out


# ------------------------------------------------------------------------------------------- checkpoints


def _save_model_folder(run: Run, folder: Path) -> None:
    prov = provenance(run.cfg, run.data, asdict(run.state), world_size=run.dist.world_size,
                      precision=run.precision, micro_batches_per_step=run.micro_per_step)
    write_model_folder(folder, run.model, run.data.reader.tokenizer_dir, run.cfg, prov)


def save_checkpoint(run: Run) -> None:
    """``checkpoint-last/``: model folder + optimizer, scaler, every rank's RNG and the data position."""
    rng = rng_state()
    if run.dist.distributed:
        states: list[Any] = [None] * run.dist.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if run.is_main:
        trainer = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": states,
                   "state": asdict(run.state), "seed": run.cfg.seed}

        def write(folder: Path) -> None:
            _save_model_folder(run, folder)
            write_trainer_state(folder, trainer)

        write_folder_atomically(run.cfg.out, CHECKPOINT, write, run.state.step)
    run.last_checkpoint_step = run.state.step
    run.dist.barrier()


def save_best(run: Run) -> None:
    """``best/``: the model at the evaluation with the lowest validation CE so far (``--keep-best``)."""
    if run.is_main:
        write_folder_atomically(run.cfg.out, BEST, lambda folder: _save_model_folder(run, folder),
                                run.state.step)
    run.dist.barrier()


def save_final(run: Run) -> Path:
    """``final/``: the model alone, for ``CausalFNetForCausalLM.from_pretrained``, with its tokenizer."""
    if run.is_main:
        write_folder_atomically(run.cfg.out, FINAL, lambda folder: _save_model_folder(run, folder),
                                run.state.step)
    run.dist.barrier()
    return run.cfg.out / FINAL


def _load_trainer_state(run: Run, saved: dict[str, Any]) -> None:
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = TrainState(**saved["state"])
    run.last_checkpoint_step = run.state.step
    states = saved["rng"]
    if run.dist.rank < len(states):
        set_rng_state(states[run.dist.rank])


# --------------------------------------------------------------------------------------------------- fit


def fit(run: Run, hooks: TrainHooks | None = None, stop: StopSignals | None = None) -> TrainResult:
    """Train to ``cfg.steps`` optimizer steps, evaluating, logging and checkpointing on the way. A resumed
    run that had already finished only rewrites ``final/`` when it is missing or damaged. When ``stop`` has
    recorded SIGINT/SIGTERM (on any rank), the step in progress ends (with its evaluation and checkpoint when
    due), ``checkpoint-last/`` is written at that step and ``Interrupted`` is raised."""
    t_start = time.perf_counter()
    cfg, st = run.cfg, run.state
    lc = cfg.loss_config()
    sched = cfg.schedule_config()
    keep_until = st.step if cfg.resume else None
    # --report-to: rank 0 opens the trackers (a finished run resumed has nothing to report)
    reporters = (open_reporters(cfg.report_to, cfg.out, keep_until, cfg.to_json(),
                                wandb_project=cfg.wandb_project, run_name=cfg.run_name)
                 if run.is_main and st.step < cfg.steps else [])
    metrics = MetricsLog(cfg.out, run.is_main, keep_until, reporters)
    if st.step >= cfg.steps:
        return _already_finished(run, metrics, t_start)
    last_eval: dict[str, Any] = {}
    last_train: dict[str, Any] = {}
    if run.is_main:
        _describe(run)

    bar: Progress | None = None

    def run_eval() -> None:
        nonlocal last_eval
        if run.data.val is None:
            return
        last_eval = {"event": "eval", "step": st.step, "tokens": st.tokens, **evaluate(run)}
        metrics.write(last_eval)
        if cfg.progress and run.is_main:  # also in a log file, where the bar is one line every --log-every
            kl = last_eval.get("val_kl")
            line = (f"eval step {st.step}: val CE {last_eval['val_ce']:.4f}"
                    + ("" if kl is None else f", KL to the teacher {kl:.4f}")
                    + f", top-1 agreement {last_eval['val_top1_agree']:.1%}"
                    + f", elapsed {format_duration(time.perf_counter() - t_start)}")
            if bar is not None:
                bar.write(line)
            else:
                print(line, file=sys.stderr, flush=True)
        metrics.plot()
        if cfg.keep_best and (st.best_val_ce is None or last_eval["val_ce"] < st.best_val_ce):
            st.best_val_ce, st.best_step = last_eval["val_ce"], st.step
            save_best(run)

    if st.step == 0 and cfg.eval_every:
        run_eval()
    # a bar on a terminal; in a log file one plain line every --log-every steps (or 30 s) with loss and ETA.
    # Its loss is the mean over the steps since the last metrics line, up to this step: at a --log-every
    # step exactly the loss that metrics.jsonl records, in between never a stale value.
    bar = Progress(cfg.steps, desc="train", unit="step", initial=st.step,
                   enabled=cfg.progress and run.is_main, every=cfg.log_every)
    window = np.zeros(7)
    window_t, window_steps = time.perf_counter(), 0
    try:
        while st.step < cfg.steps:
            run.sampler.set_epoch(st.epoch, st.batches_consumed)
            batches = iter(run.loader)
            finished_epoch = True
            for plan in run.sampler.steps():
                micro = []
                for _ in plan.micro_batches:
                    batch = next(batches).to(run.device)
                    if hooks is not None and hooks.micro_batch is not None:
                        hooks.micro_batch(st.step, batch)
                    micro.append(batch)
                sums = accumulate(run, micro, plan.num_supervised, hooks).tolist()
                loss = step_loss(sums, lc.alpha, lc.temperature)
                if not (math.isfinite(loss) and math.isfinite(sums[6])):
                    loss = loss if not math.isfinite(loss) else sums[6]
                    raise TrainingDiverged(_diverged_message(run, loss))
                lr = lr_at(st.step, sched)
                grad_norm = optimizer_step(run)
                st.step += 1
                st.batches_consumed = plan.index + 1
                st.tokens += int(sums[5])
                st.supervised_tokens += int(sums[4])
                window += np.asarray(sums)
                window_steps += 1
                shown = {"loss": step_loss(window, lc.alpha, lc.temperature)}
                if st.step % cfg.log_every == 0 or st.step == cfg.steps:
                    dt = max(time.perf_counter() - window_t, 1e-9)
                    rows = max(window[4], 1.0)
                    last_train = {
                        "event": "train", "step": st.step, "epoch": st.epoch, "tokens": st.tokens,
                        "supervised_tokens": st.supervised_tokens, "lr": lr,
                        "loss": step_loss(window, lc.alpha, lc.temperature), "ce": float(window[0] / rows),
                        "kd": float(window[1] / rows) if lc.alpha < 1 else None,
                        "top1_agree": float(window[2] / rows), "grad_norm": grad_norm,
                        "tokens_per_s": float(window[5] / dt),
                        "steps_per_s": window_steps / dt, "elapsed_s": time.perf_counter() - t_start,
                    }
                    metrics.write(last_train)
                    window[:] = 0
                    window_t, window_steps = time.perf_counter(), 0
                bar.update(1, tokens=int(sums[5]), **shown)
                if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.steps:
                    run_eval()
                if cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.steps:
                    save_checkpoint(run)
                if hooks is not None and hooks.after_step is not None:
                    hooks.after_step(st.step)
                if stop is not None and st.step < cfg.steps and (signum := stop.agreed(run.device)):
                    if run.last_checkpoint_step != st.step:
                        save_checkpoint(run)
                    raise Interrupted(signum, _stopped_line(run.cfg, signum, run))
                if st.step >= cfg.steps:
                    finished_epoch = False
                    break
            del batches
            if finished_epoch:
                st.epoch += 1
                st.batches_consumed = 0
    except BaseException:
        metrics.close()  # the TensorBoard writer's thread ends with its events flushed
        raise
    finally:
        bar.close()
    try:
        run_eval()
        save_checkpoint(run)
        save_final(run)
        metrics.plot(force=True)
    finally:
        metrics.close()
    wall = time.perf_counter() - t_start
    final = {k: v for k, v in {**last_train, **last_eval}.items() if k != "event"}
    final.update(step=st.step, tokens=st.tokens, supervised_tokens=st.supervised_tokens, wall_s=wall)
    return TrainResult(out_dir=cfg.out, final_metrics=final, wall_s=wall)


def _already_finished(run: Run, metrics: MetricsLog, t_start: float) -> TrainResult:
    """``--resume`` of a run whose last checkpoint is its final step: its final evaluation is already in
    ``metrics.jsonl``; only a missing or damaged ``final/`` is written again."""
    st = run.state
    if run.is_main:
        print(f"train-student: the run in {run.cfg.out} already reached step {st.step}; nothing to train",
              file=sys.stderr)
    if run.is_main and folder_problem(run.cfg.out / FINAL) is not None:
        write_folder_atomically(run.cfg.out, FINAL, lambda folder: _save_model_folder(run, folder), st.step)
    run.dist.barrier()
    last = {k: v for k, v in {**metrics.last("train"), **metrics.last("eval")}.items() if k != "event"}
    metrics.close()
    wall = time.perf_counter() - t_start
    last.update(step=st.step, tokens=st.tokens, supervised_tokens=st.supervised_tokens, wall_s=wall)
    return TrainResult(out_dir=run.cfg.out, final_metrics=last, wall_s=wall)


def _diverged_message(run: Run, loss: float) -> str:
    where = (f"the last good checkpoint is {run.cfg.out / CHECKPOINT} (step {run.last_checkpoint_step})"
             if run.last_checkpoint_step is not None else "no checkpoint had been saved yet")
    return (f"loss is {loss} at step {run.state.step + 1}; stopped before updating the weights, {where}; "
            "lower --lr (or raise --warmup, use --clip) and resume or restart")


def _describe(run: Run) -> None:
    mc = run.model.config
    if isinstance(run.model, CausalLMStudent):
        shape = describe_causal_lm(run.model)
    else:
        vocab = (f"{mc.vocab_size} (compacted from {mc.full_vocab_size})" if mc.vocab_map
                 else str(mc.vocab_size))
        shape = (f"d={mc.hidden_size}, {mc.num_hidden_layers} layers, FFN {mc.intermediate_size}, "
                 f"W={mc.stft_window_size}, vocab {vocab}")
    print(f"train-student: {count_parameters(run.model):,} parameters ({shape}); "
          f"{len(run.data.train)} train sequences"
          + ("" if not run.data.mix else " per epoch (" + ", ".join(
              f"{n:,} from {c}" for c, n in zip(run.data.mix["caches"], run.data.mix["counts"])) + ")")
          + ", "
          f"{'no' if run.data.val is None else len(run.data.val)} validation sequences; "
          f"{run.micro_per_step} micro-batches of <= {run.cfg.batch_tokens} tokens per step "
          f"({run.dist.world_size} rank(s)); {run.device} {run.precision}"
          + (f"; resuming at step {run.state.step}" if run.cfg.resume else ""), file=sys.stderr)


# ------------------------------------------------------------------------------------------- interruption


def resume_command(cfg: TrainConfig, resume: bool = True) -> str:
    """The command that continues this run: the process's own ``fnet-distill train-student`` (or torchrun)
    line with ``--resume`` added; for a library call, an equivalent ``fnet-distill train-student`` line."""
    line = command_line("train-student", ["--resume"] if resume else [])
    if line is not None:
        return line
    args = ["fnet-distill", "train-student"]
    for f in fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name in ("resume", "schedule_steps") or (f.default is not MISSING and v == f.default):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("cache", "mix_caches"):
            args += [a for p in (v if f.name == "mix_caches" else [v]) for a in ("--cache", str(p))]
        elif f.name == "cache_weights":
            args += [flag, ",".join(f"{w:g}" for w in v)]
        elif isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        else:
            args += [flag, str(v)]
    args += ["--resume"] if resume else []
    return shlex.join(args)


def _stopped_line(cfg: TrainConfig, signum: int, run: Run | None) -> str:
    """The one line printed when SIGINT/SIGTERM stopped the run: where it stopped and how to go on."""
    head = f"train-student: stopped by {signal_name(signum)}"
    if run is not None:
        step = run.state.step
        return (f"{head} after step {step} of {run.cfg.steps}; saved {cfg.out / CHECKPOINT} (step {step}); "
                f"resume with: {resume_command(cfg)}")
    if (cfg.out / CHECKPOINT / TRAINER_STATE).is_file():
        return (f"{head} before its first step; {cfg.out / CHECKPOINT} is unchanged; resume with: "
                f"{resume_command(cfg)}")
    return f"{head} before its first step; nothing was saved; start again with: {resume_command(cfg, False)}"


def _second_line(cfg: TrainConfig, run: Run | None, signum: int) -> str:
    head = f"train-student: second {signal_name(signum)}, stopped at once without saving"
    step = run.last_checkpoint_step if run is not None else None
    if step is None and not (cfg.out / CHECKPOINT / TRAINER_STATE).is_file():
        return f"{head}; no checkpoint yet, start again with: {resume_command(cfg, False)}"
    where = f"{cfg.out / CHECKPOINT}" + (f" (step {step})" if step is not None else "")
    return f"{head}; the last checkpoint, {where}, is kept; resume with: {resume_command(cfg)}"


def train_student(cfg: TrainConfig, hooks: TrainHooks | None = None) -> TrainResult:
    """Train a student from ``cfg.cache`` into ``cfg.out`` (under ``torchrun`` too); see ``TrainConfig``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bar, between our own progress lines
    dist = Dist.from_env()
    own_group = False
    if dist.distributed and not torch.distributed.is_initialized():
        nccl = torch.cuda.is_available() and cfg.device != "cpu"
        if nccl:
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group("nccl" if nccl else "gloo", timeout=datetime.timedelta(hours=2))
        own_group = True
    run = None
    # SIGINT/SIGTERM: during setup the run stops at once (nothing of it to save yet); from the first step on,
    # at the end of the step in progress with a checkpoint; a second signal exits at once.
    stop = StopSignals(lambda signum: _second_line(cfg, run, signum) if dist.rank == 0 else "",
                       distributed=dist.distributed)
    try:
        with stop:
            run = setup(cfg, dist)
            if hooks is not None and hooks.ready is not None:
                hooks.ready()
            stop.defer()
            return fit(run, hooks, stop)
    except Interrupted as e:
        if e.detailed:
            raise
        raise Interrupted(e.signum, _stopped_line(cfg, e.signum, None)) from None
    except torch.cuda.OutOfMemoryError:
        step = run.state.step + 1 if run is not None else 0
        raise UserError(f"CUDA out of memory at step {step}; lower --batch-tokens, use --compact-vocab or "
                        "--grad-checkpointing") from None
    finally:
        if run is not None:
            run.close()
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
