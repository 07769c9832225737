"""The run config of ``train-student`` (``TrainConfig``): every setting that defines a training run, checked
when it is built, so a bad option fails before any cache is opened."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cache.util import UserError
from student.losses import LossConfig
from student.reporting import parse_report_to
from student.schedule import OptimizerConfig, ScheduleConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# --student: the causal STFT FNet, or a stock transformers architecture at the shape options
STUDENTS = ("fnet", "qwen2", "llama")

# Settings that may change between an interrupted run and its resumption: they do not change the result
# (cache paths are checked by fingerprint digest instead).
# The student's shape options: --student-config or --init-from replace them (the model's own config, saved
# beside as train_config.json's "student", holds the shape), so a run records them as null then.
SHAPE_FIELDS = ("hidden_size", "layers", "ffn", "window", "max_positions", "dropout", "heads")

RESUME_FREE = frozenset({"cache", "mix_caches", "val_cache", "out", "resume", "num_workers", "device",
                         "compile",
                         "eval_every", "save_every", "log_every", "progress", "extend", "keep_best",
                         "report_to", "wandb_project", "run_name", "record_cache_mb"})


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``student``: the architecture, ``fnet`` (the causal STFT
    FNet) or a stock transformers one (``qwen2``, ``llama``; ``heads`` attention heads, default
    ``hidden_size // 64``). ``student_config`` (a JSON file of ``CausalFNetConfig`` fields, or of any
    transformers config with its ``model_type``) replaces the shape fields ``hidden_size .. dropout``.
    ``warmup=None`` means
    ``min(100, steps // 10)``. ``accum`` is micro-batches per rank per step; ``step_tokens`` instead sets
    the global step size (``ceil(step_tokens / batch_tokens)`` micro-batches over all ranks).
    ``eval_every``/``save_every`` 0 mean only at the end.

    ``mix_caches``: more training caches of the same teacher and tokenizer, read beside ``cache``;
    ``cache_weights`` (one per cache, ``cache`` first): the share of each epoch's sequences drawn from each
    (default: every sequence of every cache once).

    ``init_from``: start from the weights (and shape) of a trained student folder instead of a random
    initialisation. ``extend`` (with ``resume``): continue to a larger ``steps``; the learning-rate schedule
    stays the checkpoint's (``warmup`` and the cosine over ``schedule_steps``, the original ``steps``) and
    the added steps run at ``min_lr``. ``keep_best``: also keep ``best/``, the model with the lowest
    validation CE so far. ``report_to``: ``none``, ``tensorboard``, ``wandb`` or ``tensorboard,wandb``: the
    trackers that also get the metrics (``student.reporting``); ``wandb_project`` and ``run_name`` name the
    W&B run (defaults: ``$WANDB_PROJECT`` or ``fnet-distill``, and the name of ``out``).

    The loss, schedule and optimizer defaults are ``LossConfig``'s, ``ScheduleConfig``'s and
    ``OptimizerConfig``'s (declared there once); each field is also a ``train-student`` option and a key of
    a ``--config`` file (``tests/test_settings.py`` holds the option's type and default equal to the
    field's)."""

    cache: Path
    out: Path
    mix_caches: tuple[Path, ...] = ()
    cache_weights: tuple[float, ...] | None = None
    val_cache: Path | None = None
    val_fraction: float = 0.0
    student_config: Path | None = None
    init_from: Path | None = None
    student: str = "fnet"
    heads: int | None = None
    hidden_size: int = 256
    layers: int = 4
    ffn: int = 1024
    window: int = 32
    max_positions: int = 1024
    dropout: float = 0.1
    steps: int = ScheduleConfig.total_steps
    batch_tokens: int = 16384
    accum: int | None = None
    step_tokens: int | None = None
    lr: float = ScheduleConfig.lr
    min_lr: float = ScheduleConfig.min_lr
    warmup: int | None = None
    weight_decay: float = OptimizerConfig.weight_decay
    clip: float = 1.0
    alpha: float = LossConfig.alpha
    temperature: float = LossConfig.temperature
    kd: str = LossConfig.kind
    chunk_size: int = LossConfig.chunk_size
    compact_vocab: bool = False
    precision: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    eval_every: int = 200
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    extend: bool = False
    schedule_steps: int | None = None
    keep_best: bool = False
    report_to: str = "none"
    wandb_project: str | None = None
    run_name: str | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 2
    record_cache_mb: int = 512
    progress: bool = True

    def __post_init__(self) -> None:
        self.cache = Path(self.cache)
        self.out = Path(self.out)
        self.mix_caches = tuple(Path(p) for p in self.mix_caches)
        if self.cache_weights is not None:
            self.cache_weights = tuple(float(w) for w in self.cache_weights)
            n = 1 + len(self.mix_caches)
            if len(self.cache_weights) != n:
                raise UserError(f"--cache-weights has {len(self.cache_weights)} values for {n} --cache "
                                f"folders; give one weight per --cache, in the same order")
            if any(not (w > 0 and w < float("inf")) for w in self.cache_weights):
                raise UserError(f"--cache-weights must be positive numbers, got {list(self.cache_weights)}")
        if len({p.resolve() for p in self.caches}) != len(self.caches):
            raise UserError("the same --cache folder is given twice; give each cache once (use "
                            "--cache-weights to draw one more often)")
        self.val_cache = None if self.val_cache is None else Path(self.val_cache)
        self.student_config = None if self.student_config is None else Path(self.student_config)
        self.init_from = None if self.init_from is None else Path(self.init_from)
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
        for name in ("eval_every", "save_every", "num_workers", "record_cache_mb"):
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
        if self.extend and not self.resume:
            raise UserError("--extend continues a run to a larger --steps; use it with --resume")
        if self.schedule_steps is not None and not 1 <= self.schedule_steps <= self.steps:
            raise UserError(f"schedule_steps must be in [1, steps={self.steps}] (got {self.schedule_steps})")
        if self.keep_best and self.val_cache is None and not self.val_fraction:
            raise UserError("--keep-best picks the model by validation CE; give --val-cache or "
                            "--val-fraction")
        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"  # one line if wrong
        if self.student not in STUDENTS:
            raise UserError(f"--student must be one of {'|'.join(STUDENTS)} (got {self.student!r}); another "
                            "transformers architecture comes as --student-config with its model_type")
        if self.heads is not None and (self.heads < 1 or self.student == "fnet"):
            raise UserError(f"--heads {self.heads}: attention heads of a transformer student (--student "
                            f"{'|'.join(STUDENTS[1:])}), >= 1; the FNet has none")
        if self.init_from is not None:
            if not (self.init_from / "config.json").is_file():
                raise UserError(f"--init-from {self.init_from} is not a model folder (no config.json); "
                                "pass a final/, best/ or checkpoint-last/ folder written by train-student, "
                                "a cut-student folder or a pretrained causal LM folder")
            if self.student_config is not None or self.student != "fnet" or self.heads is not None:
                raise UserError("--init-from takes the student's architecture and shape from its folder; "
                                "drop --student-config / --student / --heads")
            if self.compact_vocab and _model_type(self.init_from) in (None, "causal_stft_fnet"):
                raise UserError("--init-from a trained FNet student keeps its folder's vocabulary; drop "
                                "--compact-vocab (it applies to a transformers model folder)")
        if self.student_config is not None and not self.student_config.is_file():
            raise UserError(f"--student-config {self.student_config} is not a file; pass a JSON file of "
                            "CausalFNetConfig fields (e.g. a checkpoint's config.json)")
        self.loss_config()
        self.schedule_config()
        OptimizerConfig(weight_decay=self.weight_decay)

    @property
    def caches(self) -> tuple[Path, ...]:
        """Every training cache: ``cache`` then ``mix_caches``."""
        return (self.cache, *self.mix_caches)

    def loss_config(self) -> LossConfig:
        return LossConfig(kind=self.kd, alpha=self.alpha, temperature=self.temperature,
                          chunk_size=self.chunk_size)

    def schedule_config(self) -> ScheduleConfig:
        return ScheduleConfig(lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup,
                              total_steps=self.schedule_steps or self.steps)

    def to_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, Path):
                return str(v)
            return [plain(x) for x in v] if isinstance(v, tuple) else v

        return {k: plain(v) for k, v in asdict(self).items()}


def _model_type(folder: Path) -> str | None:
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return d.get("model_type") if isinstance(d, dict) else None


def recorded_config(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg.to_json()`` as a run records it in ``train_config.json``: the shape options null when
    ``--student-config`` or ``--init-from`` replaced them, so the file never shows a shape the model does
    not have."""
    out = cfg.to_json()
    if cfg.student_config is not None or cfg.init_from is not None:
        out.update(dict.fromkeys(SHAPE_FIELDS))
    return out
