"""The demo's student and its training budget (``StudentBudget``): what ``fnet-distill demo`` trains, and what
the cache-size study (``bench/study_cache_size.py``) trains at its own budget.

The student is a set of overrides of ``TrainConfig``, the config ``train-student`` runs: only what the demo
sets otherwise is written here (``DEMO_STUDENT``); every other setting is ``TrainConfig``'s default, read from
there."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from student.train_config import TrainConfig

# What the demo's student and budget (at --scale 1) set otherwise than train-student's defaults: a small
# FNet (d 32, 3 layers, FFN 128; ~148k parameters) trained 9600 steps of <= 512 tokens at a higher rate.
# The batch was chosen on the KD-on-references baseline alone: at the same 4.9 M tokens, 9600 steps of 512
# tokens gave it 51.2% exact answers against 34.7% for 2400 steps of 2048 (seed 0, docs/demo-run.md).
DEMO_STUDENT: dict[str, Any] = {"hidden_size": 32, "layers": 3, "ffn": 128, "max_positions": 256,
                                "steps": 9600, "batch_tokens": 512, "lr": 6e-3, "min_lr": 6e-4, "warmup": 30}
# The TrainConfig settings that make a demo student and its budget, the same for the KD and the CE-only runs
# (only alpha differs); report.json lists them (``StudentBudget.to_json``).
BUDGET_FIELDS = ("hidden_size", "layers", "ffn", "window", "max_positions", "dropout", "steps",
                 "batch_tokens", "lr", "min_lr", "warmup", "weight_decay", "kd", "alpha", "temperature",
                 "compact_vocab")
TRAIN_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


@dataclass(frozen=True)
class StudentBudget:
    """The student and its training budget, shared by the KD and the CE-only runs (only ``alpha`` differs):
    ``overrides`` of ``TrainConfig``'s defaults (names of ``BUDGET_FIELDS``), and the evaluations per run.
    A field reads as an attribute (``budget.steps``): the override, else ``TrainConfig``'s default."""

    overrides: dict[str, Any] = field(default_factory=lambda: dict(DEMO_STUDENT))
    eval_points: int = 8

    def __post_init__(self) -> None:
        unknown = sorted(set(self.overrides) - set(BUDGET_FIELDS))
        if unknown:
            raise ValueError(f"StudentBudget overrides {unknown} are not student settings; use "
                             f"{', '.join(BUDGET_FIELDS)}")

    def __getattr__(self, name: str) -> Any:
        # only called for names that are not attributes: the budget's TrainConfig settings
        if name not in BUDGET_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.overrides[name] if name in self.overrides else TRAIN_DEFAULTS[name]

    def replace(self, *, eval_points: int | None = None, **settings: Any) -> StudentBudget:
        """This budget with some settings changed (``TrainConfig`` names, or ``eval_points``)."""
        return StudentBudget({**self.overrides, **settings},
                             self.eval_points if eval_points is None else eval_points)

    def train_config(self, **run: Any) -> TrainConfig:
        """The ``TrainConfig`` of this student and budget; ``run`` gives the rest (cache, out, alpha, seed,
        evaluation and logging, ...) and may override any field. Warmup is at most half the steps."""
        warmup = None if self.warmup is None else min(self.warmup, self.steps // 2)
        return TrainConfig(**{**self.overrides, "warmup": warmup, **run})

    def to_json(self) -> dict[str, Any]:
        """Every setting's value (``BUDGET_FIELDS`` and ``eval_points``)."""
        return {**{name: getattr(self, name) for name in BUDGET_FIELDS}, "eval_points": self.eval_points}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StudentBudget:
        """The budget ``to_json`` wrote."""
        return cls({k: v for k, v in d.items() if k != "eval_points"}, d["eval_points"])
