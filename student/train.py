"""Stage two: train the causal STFT FNet student from a teacher cache (``setup -> fit``); no teacher loaded.

One optimizer step is the whole accumulation window over all ranks (``TokenBudgetBatchSampler.steps()``):

    loss = (alpha * CE_sum + (1 - alpha) * tau^2 * KD_sum) / step.num_supervised

The losses are sums (``student.losses``), so micro-batches and ranks can split a step any way; under DDP,
which averages gradients, each rank's loss is multiplied by ``world_size``. Each layer's STFT kernel is
computed once per optimizer step (``model.shared_kernels()``); its gradient reaches the projection weight
when that block exits, outside DDP's hooks, so those weights are excluded from DDP and all-reduced here.

An output folder holds ``checkpoint-last/`` (the model as ``save_pretrained`` + the cache's tokenizer +
``train_config.json`` + ``provenance.json`` + ``trainer_state.pt`` with optimizer, scaler, RNG and data
position), ``final/`` (the same without the trainer state), ``metrics.jsonl`` and ``curves.png``. Both folders
are written beside their final name and renamed into place. ``resume`` continues from ``checkpoint-last/``
exactly: the data position comes from the deterministic sampler, the learning rate from ``lr_at(step)``.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cache.util import UserError, atomic_replace_dir, atomic_write_bytes, atomic_write_json, fsync_tree
from student.device import Dist, resolve_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT = "checkpoint-last"
FINAL = "final"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
TRAIN_CONFIG = "train_config.json"
PROVENANCE = "provenance.json"
TRAINER_STATE = "trainer_state.pt"

# Settings that may change between an interrupted run and its resumption: they do not change the result
# (cache paths are checked by fingerprint digest instead).
RESUME_FREE = frozenset({"cache", "val_cache", "out", "resume", "num_workers", "device", "compile",
                         "eval_every", "save_every", "log_every", "progress"})


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; nothing was updated with it and the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``student_config`` (a JSON file of ``CausalFNetConfig``
    fields) replaces the shape fields ``hidden_size .. dropout``. ``warmup=None`` means
    ``min(100, steps // 10)``. ``accum`` is micro-batches per rank per step; ``step_tokens`` instead sets
    the global step size (``ceil(step_tokens / batch_tokens)`` micro-batches over all ranks).
    ``eval_every``/``save_every`` 0 mean only at the end."""

    cache: Path
    out: Path
    val_cache: Path | None = None
    val_fraction: float = 0.0
    student_config: Path | None = None
    hidden_size: int = 256
    layers: int = 4
    ffn: int = 1024
    window: int = 32
    max_positions: int = 1024
    dropout: float = 0.1
    steps: int = 2000
    batch_tokens: int = 16384
    accum: int | None = None
    step_tokens: int | None = None
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int | None = None
    weight_decay: float = 0.1
    clip: float = 1.0
    alpha: float = 0.5
    temperature: float = 2.0
    kd: str = "topk_tail"
    chunk_size: int = 1024
    compact_vocab: bool = False
    precision: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        from student.schedule import OptimizerConfig, ScheduleConfig

        self.cache = Path(self.cache)
        self.out = Path(self.out)
        self.val_cache = None if self.val_cache is None else Path(self.val_cache)
        self.student_config = None if self.student_config is None else Path(self.student_config)
        if self.warmup is None:
            self.warmup = min(100, self.steps // 10)
        if self.val_cache is not None and self.val_fraction:
            raise UserError("give either --val-cache or --val-fraction, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1) (got {self.val_fraction}); e.g. 0.05")
        for name in ("hidden_size", "layers", "ffn", "window", "max_positions", "steps", "batch_tokens",
                     "chunk_size", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("eval_every", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if self.accum is not None and self.step_tokens is not None:
            raise UserError("give either --accum (micro-batches per rank) or --step-tokens (global), "
                            "not both")
        if self.accum is not None and self.accum < 1:
            raise UserError(f"--accum must be >= 1 (got {self.accum})")
        if self.step_tokens is not None and self.step_tokens < self.batch_tokens:
            raise UserError(f"--step-tokens {self.step_tokens} is smaller than one micro-batch "
                            f"(--batch-tokens {self.batch_tokens}); raise it or lower --batch-tokens")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not self.clip >= 0:
            raise UserError(f"--clip must be >= 0 (0 disables clipping; got {self.clip})")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {'|'.join(PRECISIONS)} (got {self.precision!r})")
        if self.student_config is not None and not self.student_config.is_file():
            raise UserError(f"--student-config {self.student_config} is not a file; pass a JSON file of "
                            "CausalFNetConfig fields (e.g. a checkpoint's config.json)")
        self.loss_config()
        ScheduleConfig(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup, total_steps=self.steps)
        OptimizerConfig(weight_decay=self.weight_decay)

    def loss_config(self):
        from student.losses import LossConfig

        return LossConfig(kind=self.kd, alpha=self.alpha, temperature=self.temperature,
                          chunk_size=self.chunk_size)

    def schedule_config(self):
        from student.schedule import ScheduleConfig

        return ScheduleConfig(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup,
                              total_steps=self.steps)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


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
    its evaluation and checkpoint."""

    loss: Callable[[int, Tensor], Tensor] | None = None
    micro_batch: Callable[[int, Any], None] | None = None
    after_step: Callable[[int], None] | None = None


# --------------------------------------------------------------------------------------------------- data


class SequenceSubset(torch.utils.data.Dataset):
    """Some sequences of a cache (a train/validation split), with the index arrays the sampler reads."""

    def __init__(self, reader, indices: np.ndarray):
        self.reader = reader
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.reader[int(self.indices[i])]

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.reader.lengths, dtype=np.int64)[self.indices]

    @property
    def num_supervised(self) -> np.ndarray:
        return np.asarray(self.reader.num_supervised, dtype=np.int64)[self.indices]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sequence indices, sorted; a pure function of ``(n, val_fraction, seed)``."""
    n_val = max(1, round(n * val_fraction))
    if n_val >= n:
        raise UserError(f"--val-fraction {val_fraction} leaves no training sequences out of {n}; lower it")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class TrainData:
    reader: Any  # CacheReader of the training cache
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    val_reader: Any  # CacheReader the validation sequences come from (None without validation)
    temp_index: int  # temperature column for the KD term
    val_t1_index: int | None  # T = 1 column of the validation cache (None: no KL metric)
    pad_id: int
    eos_id: int | None


def _tokenizer_info(reader) -> dict[str, Any]:
    return reader.manifest.get("tokenizer") or {}


def _check_same_vocabulary(train, val) -> None:
    """The validation cache must come from the same teacher and tokenizer as the training cache."""
    ta, tb = _tokenizer_info(train), _tokenizer_info(val)
    pairs = {
        "teacher vocab_size": (train.vocab_size, val.vocab_size),
        "tokenizer hash": (ta.get("hash"), tb.get("hash")),
        "tokenizer vocab_size": (ta.get("vocab_size"), tb.get("vocab_size")),
        "teacher": (train.fingerprint.get("teacher"), val.fingerprint.get("teacher")),
        "chat_template": (train.fingerprint.get("chat_template"), val.fingerprint.get("chat_template")),
    }
    diff = [f"{k}: {a!r} vs {b!r}" for k, (a, b) in pairs.items() if a != b]
    if diff:
        raise UserError(f"--val-cache {val.path} was not made with the training cache's teacher/tokenizer ("
                        + "; ".join(diff) + "); build it with the same teacher-cache settings")


def open_training_data(cfg: TrainConfig) -> TrainData:
    """Open and check the caches: intact (manifest, index and every shard hash), a temperature the cache
    serves exactly, samples for ``--kd sampled``, a validation set from the same teacher/tokenizer."""
    from cache.format import open_cache
    from student.data import CacheDataset

    reader = open_cache(cfg.cache, verify_hashes="all")
    if len(reader) == 0:
        raise UserError(f"the cache {cfg.cache} holds no sequences; rebuild it with teacher-cache")
    needs_kd = cfg.alpha < 1.0
    if needs_kd and cfg.kd == "sampled":
        if reader.samples <= 0:
            raise UserError(f"--kd sampled needs a cache written with samples, but {cfg.cache} has none; "
                            "rebuild it with teacher-cache --samples N or choose another --kd")
        temp_index = 0  # the sampled loss reads no temperature column
    elif needs_kd:
        try:
            temp_index = reader.temperature_index(cfg.temperature)
        except UserError as e:
            raise UserError(f"--temperature {cfg.temperature:g} cannot be served exactly: {e}") from None
    else:
        temp_index = 0  # CE only
    val_reader, val = None, None
    if cfg.val_cache is not None:
        val_reader = open_cache(cfg.val_cache, verify_hashes="all")
        _check_same_vocabulary(reader, val_reader)
        train = CacheDataset(reader)
        val = CacheDataset(val_reader)
    elif cfg.val_fraction > 0:
        tr, va = split_indices(len(reader), cfg.val_fraction, cfg.seed)
        train, val, val_reader = SequenceSubset(reader, tr), SequenceSubset(reader, va), reader
    else:
        train = CacheDataset(reader)
    val_t1 = None
    if val_reader is not None:
        try:
            val_t1 = val_reader.temperature_index(1.0)
        except UserError:
            val_t1 = None
    tok = _tokenizer_info(reader)
    eos = tok.get("eos_token_id")
    pad = tok.get("pad_token_id")
    pad = pad if pad is not None else (eos if eos is not None else 0)
    return TrainData(reader=reader, train=train, val=val, val_reader=val_reader, temp_index=temp_index,
                     val_t1_index=val_t1, pad_id=int(pad), eos_id=None if eos is None else int(eos))


# -------------------------------------------------------------------------------------------------- model


def cache_token_ids(data: TrainData) -> np.ndarray:
    """Sorted ids used in the training and validation caches plus eos/pad (the compact vocabulary)."""
    from student.modeling import compact_ids_from_cache

    special = [i for i in (data.pad_id, data.eos_id) if i is not None]
    ids = compact_ids_from_cache(data.reader, special)
    if data.val_reader is not None and data.val_reader is not data.reader:
        ids = np.union1d(ids, compact_ids_from_cache(data.val_reader, special))
    return ids.astype(np.int64)


def student_model_config(cfg: TrainConfig, data: TrainData):
    """The student's ``CausalFNetConfig`` for this cache, checked against the cache's vocabulary."""
    from student.modeling import CausalFNetConfig

    reader = data.reader
    if cfg.student_config is not None:
        try:
            d = json.loads(cfg.student_config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--student-config {cfg.student_config} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UserError(f"--student-config {cfg.student_config} must hold a JSON object of config fields")
        for k in ("model_type", "architectures", "transformers_version", "auto_map", "dtype", "torch_dtype"):
            d.pop(k, None)
        d.setdefault("vocab_size", reader.vocab_size)
    else:
        d = dict(vocab_size=reader.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                 intermediate_size=cfg.ffn, stft_window_size=cfg.window,
                 max_position_embeddings=cfg.max_positions, hidden_dropout_prob=cfg.dropout)
    d.update(pad_token_id=data.pad_id, eos_token_id=data.eos_id)
    if cfg.compact_vocab:
        ids = cache_token_ids(data)
        d.update(vocab_size=len(ids), vocab_map=ids.tolist(), full_vocab_size=reader.vocab_size)
    mc = CausalFNetConfig(**d)
    check_student_vocabulary(mc, data)
    longest = int(max(np.max(reader.lengths), np.max(data.val_reader.lengths) if data.val_reader else 0))
    if longest > mc.max_position_embeddings:
        raise UserError(f"the cache holds sequences of {longest} tokens but the student has "
                        f"max_position_embeddings={mc.max_position_embeddings}; raise --max-positions")
    return mc


def check_student_vocabulary(mc, data: TrainData) -> None:
    """A full-vocabulary student must have a row for every teacher logit; a compacted one for every id the
    caches use."""
    reader = data.reader
    tok_vocab = _tokenizer_info(reader).get("vocab_size")
    if mc.vocab_map is None:
        if mc.vocab_size < reader.vocab_size:
            raise UserError(f"the student's vocab_size {mc.vocab_size} does not cover the cache's vocabulary "
                            f"(teacher logits width {reader.vocab_size}, tokenizer {tok_vocab} tokens); use "
                            f"vocab_size >= {reader.vocab_size} or --compact-vocab")
        return
    if tok_vocab is not None and mc.full_vocab_size < tok_vocab:
        raise UserError(f"the student's full_vocab_size {mc.full_vocab_size} is smaller than the cache's "
                        f"tokenizer ({tok_vocab} tokens); rebuild the student config with --compact-vocab")
    missing = np.setdiff1d(cache_token_ids(data), np.asarray(mc.vocab_map, dtype=np.int64))
    if len(missing):
        raise UserError(f"the student's vocab_map lacks {len(missing)} token ids the cache uses (e.g. "
                        f"{missing[:5].tolist()}); use --compact-vocab to build it from this cache")


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
        from student.data import gather_rows
        from student.losses import chunked_distill_loss

        hidden = self.model.hidden_states(input_ids, attention_mask)  # (B, Lmax, d)
        rows = gather_rows(hidden, pred_pos)  # (N, d)
        head = self.model.get_output_embeddings().weight  # (V, d)
        s = chunked_distill_loss(rows, head, targets, kind=self.kind, temperature=self.temperature,
                                 chunk_size=self.chunk_size, with_kd=self.with_kd,
                                 grad_weights=self.grad_weights)
        return s.ce, s.kd, s.top1_agree, s.label_correct


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_consumed: int = 0  # global steps done in ``epoch``
    tokens: int = 0  # real (non-padding) tokens seen, all ranks
    supervised_tokens: int = 0


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
    from student.data import Collator, make_dataloader

    # A private generator: creating an iterator draws its worker base seed from it, not from the global RNG
    # that dropout uses, so evaluations and resumes leave the training randomness untouched. Workers persist
    # across epochs (the batch sampler runs in the main process, so set_epoch still applies).
    return make_dataloader(dataset, sampler, Collator(pad_id=pad_id), num_workers=num_workers, device=device,
                           persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))


def setup(cfg: TrainConfig, dist: Dist | None = None) -> Run:
    """Open and check the caches, build (or reload, with ``resume``) the student, optimizer and data."""
    from student.data import TokenBudgetBatchSampler
    from student.modeling import CausalFNetForCausalLM, CausalSTFT
    from student.schedule import OptimizerConfig, build_optimizer

    dist = dist or Dist.from_env()
    device = resolve_device(cfg.device, dist)
    precision = resolve_precision(cfg.precision, device)
    ckpt = cfg.out / CHECKPOINT
    if cfg.resume and not (ckpt / TRAINER_STATE).is_file():
        raise UserError(f"--resume: there is no checkpoint in {ckpt}; run without --resume to start")
    if not cfg.resume and ckpt.exists():
        raise UserError(f"{cfg.out} already holds a training run ({CHECKPOINT}/); pass --resume to "
                        "continue it or choose another --out")
    data = open_training_data(cfg)
    saved = None
    if cfg.resume:
        saved = check_resume(cfg, ckpt, data)
        model = CausalFNetForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        check_student_vocabulary(model.config, data)
    else:
        mc = student_model_config(cfg, data)
        torch.manual_seed(cfg.seed)
        model = CausalFNetForCausalLM(mc)
    model.to(device).train()
    if cfg.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _seed_everything(cfg.seed * 1000 + dist.rank + 1)

    from student.losses import grad_weights_for

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
    from student.losses import DistillTargets

    targets = DistillTargets.from_batch(batch, temp_index)
    if run.model.config.vocab_map is not None:
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
                from student.losses import LossSums, combine_loss

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
    from student.schedule import lr_at, set_lr

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
    from student.data import TokenBudgetBatchSampler, gather_rows
    from student.losses import chunked_distill_loss

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
                                         temperature=1.0, chunk_size=run.cfg.chunk_size, with_kd=with_kl)
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


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _provenance(run: Run) -> dict[str, Any]:
    from cache.version import __version__

    data = run.data
    return {
        "cache": str(run.cfg.cache), "cache_fingerprint_digest": data.reader.fingerprint_digest,
        "val_cache": None if run.cfg.val_cache is None else str(run.cfg.val_cache),
        "val_cache_fingerprint_digest": (data.val_reader.fingerprint_digest
                                         if data.val_reader is not None else None),
        "code_version": __version__, "torch": torch.__version__, "step": run.state.step,
        "tokens": run.state.tokens, "supervised_tokens": run.state.supervised_tokens,
        "world_size": run.dist.world_size, "precision": run.precision,
        "micro_batches_per_step": run.micro_per_step,
    }


def write_model_folder(run: Run, folder: Path) -> None:
    """``save_pretrained`` weights + config, the cache's tokenizer, the resolved config and provenance."""
    tok = run.data.reader.tokenizer_dir
    if tok is not None and tok.is_dir():
        shutil.copytree(tok, folder, dirs_exist_ok=True)
    run.model.save_pretrained(folder)
    atomic_write_json(folder / TRAIN_CONFIG, {"config": run.cfg.to_json(),
                                              "student": run.model.config.to_diff_dict()})
    atomic_write_json(folder / PROVENANCE, _provenance(run))


def _write_folder_atomically(run: Run, name: str, extra: Callable[[Path], None] | None = None) -> Path:
    dst = run.cfg.out / name
    tmp = run.cfg.out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_model_folder(run, tmp)
        if extra is not None:
            extra(tmp)
        fsync_tree(tmp)
        atomic_replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_checkpoint(run: Run) -> None:
    """``checkpoint-last/``: model folder + optimizer, scaler, every rank's RNG and the data position."""
    rng = _rng_state()
    if run.dist.distributed:
        states: list[Any] = [None] * run.dist.world_size
        torch.distributed.all_gather_object(states, rng)
    else:
        states = [rng]
    if run.is_main:
        st = run.state
        trainer = {"optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "rng": states,
                   "state": asdict(st), "seed": run.cfg.seed}

        def write_state(folder: Path) -> None:
            buf = io.BytesIO()
            torch.save(trainer, buf)
            atomic_write_bytes(folder / TRAINER_STATE, buf.getvalue())

        _write_folder_atomically(run, CHECKPOINT, write_state)
    run.last_checkpoint_step = run.state.step
    run.dist.barrier()


def save_final(run: Run) -> Path:
    """``final/``: the model alone, for ``CausalFNetForCausalLM.from_pretrained``, with its tokenizer."""
    if run.is_main:
        _write_folder_atomically(run, FINAL)
    run.dist.barrier()
    return run.cfg.out / FINAL


def check_resume(cfg: TrainConfig, ckpt: Path, data: TrainData) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking it was made by this config on this cache."""
    try:
        saved_cfg = json.loads((ckpt / TRAIN_CONFIG).read_text())["config"]
        prov = json.loads((ckpt / PROVENANCE).read_text())
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {ckpt} is not a complete checkpoint ({e}); start a new --out") from None
    now = cfg.to_json()
    diff = [f"{k}: {saved_cfg.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now
            if k not in RESUME_FREE and saved_cfg.get(k) != now[k]]
    if prov.get("cache_fingerprint_digest") != data.reader.fingerprint_digest:
        diff.append(f"cache fingerprint: {prov.get('cache_fingerprint_digest')} in the checkpoint, "
                    f"{data.reader.fingerprint_digest} for --cache {cfg.cache}")
    val_digest = data.val_reader.fingerprint_digest if data.val_reader is not None else None
    if cfg.val_cache is not None and prov.get("val_cache_fingerprint_digest") != val_digest:
        diff.append(f"validation cache fingerprint: {prov.get('val_cache_fingerprint_digest')} in the "
                    f"checkpoint, {val_digest} for --val-cache {cfg.val_cache}")
    if diff:
        raise UserError(f"--resume: {ckpt} was made with other settings ({'; '.join(diff)}); resume with the "
                        "same options and cache, or start a new --out")
    return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)


def _load_trainer_state(run: Run, saved: dict[str, Any]) -> None:
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    run.state = TrainState(**saved["state"])
    run.last_checkpoint_step = run.state.step
    states = saved["rng"]
    if run.dist.rank < len(states):
        _set_rng_state(states[run.dist.rank])


# ------------------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per log or eval event) and its ``curves.png``; rank 0 only."""

    def __init__(self, out: Path, enabled: bool, keep_until_step: int | None):
        self.path, self.png, self.enabled = out / METRICS, out / CURVES, enabled
        if not enabled:
            return
        if keep_until_step is None:
            atomic_write_bytes(self.path, b"")
        elif self.path.exists():  # a resumed run drops what the interrupted run logged after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and _line_step(ln) is not None and _line_step(ln) <= keep_until_step]
            atomic_write_bytes(self.path, "".join(ln + "\n" for ln in kept).encode())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()

    def plot(self) -> None:
        if self.enabled:
            plot_curves(self.path, self.png)


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def plot_curves(metrics: Path, png: Path) -> None:
    """Training loss/CE/KD and validation CE/KL against steps; top-1 agreement on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if r.get("event") == "train"]
    val = [r for r in rows if r.get("event") == "eval"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("loss", "-"), ("ce", "--"), ("kd", ":")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=f"train {key}")
    for key, style in (("val_ce", "o-"), ("val_kl", "s-")):
        pts = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per supervised token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    for key, rs in (("top1_agree", train), ("val_top1_agree", val), ("val_label_acc", val)):
        pts = [(r["step"], r[key]) for r in rs if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts), label=key.replace("_", " ") if key.startswith("val") else f"train {key}")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("fraction of supervised tokens")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


# --------------------------------------------------------------------------------------------------- fit


def fit(run: Run, hooks: TrainHooks | None = None) -> TrainResult:
    """Train to ``cfg.steps`` optimizer steps, evaluating, logging and checkpointing on the way."""
    from tqdm.auto import tqdm

    from student.schedule import lr_at

    t_start = time.perf_counter()
    cfg, st = run.cfg, run.state
    lc = cfg.loss_config()
    sched = cfg.schedule_config()
    metrics = MetricsLog(cfg.out, run.is_main, st.step if cfg.resume else None)
    last_eval: dict[str, Any] = {}
    last_train: dict[str, Any] = {}
    if run.is_main and cfg.progress:
        _describe(run)

    def run_eval() -> None:
        nonlocal last_eval
        if run.data.val is None:
            return
        last_eval = {"event": "eval", "step": st.step, "tokens": st.tokens, **evaluate(run)}
        metrics.write(last_eval)
        metrics.plot()

    if st.step == 0 and cfg.eval_every:
        run_eval()
    bar = tqdm(total=cfg.steps, initial=st.step, unit="step", dynamic_ncols=True, file=sys.stderr,
               desc="train", disable=not (cfg.progress and run.is_main))
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
                    bar.set_postfix(loss=f"{last_train['loss']:.4f}",
                                    tok_s=f"{last_train['tokens_per_s']:,.0f}", refresh=False)
                    window[:] = 0
                    window_t, window_steps = time.perf_counter(), 0
                bar.update(1)
                if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.steps:
                    run_eval()
                if cfg.save_every and st.step % cfg.save_every == 0 and st.step < cfg.steps:
                    save_checkpoint(run)
                if hooks is not None and hooks.after_step is not None:
                    hooks.after_step(st.step)
                if st.step >= cfg.steps:
                    finished_epoch = False
                    break
            del batches
            if finished_epoch:
                st.epoch += 1
                st.batches_consumed = 0
    finally:
        bar.close()
    run_eval()
    save_checkpoint(run)
    save_final(run)
    metrics.plot()
    wall = time.perf_counter() - t_start
    final = {k: v for k, v in {**last_train, **last_eval}.items() if k != "event"}
    final.update(step=st.step, tokens=st.tokens, supervised_tokens=st.supervised_tokens, wall_s=wall)
    return TrainResult(out_dir=cfg.out, final_metrics=final, wall_s=wall)


def _diverged_message(run: Run, loss: float) -> str:
    where = (f"the last good checkpoint is {run.cfg.out / CHECKPOINT} (step {run.last_checkpoint_step})"
             if run.last_checkpoint_step is not None else "no checkpoint had been saved yet")
    return (f"loss is {loss} at step {run.state.step + 1}; stopped before updating the weights, {where}; "
            "lower --lr (or raise --warmup, use --clip) and resume or restart")


def _describe(run: Run) -> None:
    from student.modeling import count_parameters

    mc = run.model.config
    vocab = f"{mc.vocab_size} (compacted from {mc.full_vocab_size})" if mc.vocab_map else str(mc.vocab_size)
    print(f"train-student: {count_parameters(run.model):,} parameters (d={mc.hidden_size}, "
          f"{mc.num_hidden_layers} layers, FFN {mc.intermediate_size}, W={mc.stft_window_size}, "
          f"vocab {vocab}); "
          f"{len(run.data.train)} train sequences, "
          f"{'no' if run.data.val is None else len(run.data.val)} validation sequences; "
          f"{run.micro_per_step} micro-batches of <= {run.cfg.batch_tokens} tokens per step "
          f"({run.dist.world_size} rank(s)); {run.device} {run.precision}"
          + (f"; resuming at step {run.state.step}" if run.cfg.resume else ""), file=sys.stderr)


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
    try:
        run = setup(cfg, dist)
        return fit(run, hooks)
    except torch.cuda.OutOfMemoryError:
        step = run.state.step + 1 if run is not None else 0
        raise UserError(f"CUDA out of memory at step {step}; lower --batch-tokens, use --compact-vocab or "
                        "--grad-checkpointing") from None
    finally:
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
