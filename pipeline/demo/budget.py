"""The demo's student and its training budget (``StudentBudget``): what ``fnet-distill demo`` trains, and what
the cache-size study (``bench/study_cache_size.py``) trains at its own budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StudentBudget:
    """The student and its training budget, shared by the KD and the CE-only runs (only ``alpha`` differs)."""

    hidden_size: int = 32
    layers: int = 3
    ffn: int = 128
    window: int = 32
    max_positions: int = 256
    dropout: float = 0.1
    steps: int = 2400
    batch_tokens: int = 2048
    lr: float = 6e-3
    min_lr: float = 6e-4
    warmup: int = 30
    weight_decay: float = 0.1
    kd: str = "topk_tail"
    alpha: float = 0.2
    temperature: float = 1.0
    eval_points: int = 8
    compact_vocab: bool = False

    def train_config(self, **run: Any):
        """The ``TrainConfig`` of this student and budget; ``run`` gives the rest (cache, out, alpha, seed,
        evaluation and logging, ...) and may override any field."""
        from student.train import TrainConfig

        budget = dict(hidden_size=self.hidden_size, layers=self.layers, ffn=self.ffn, window=self.window,
                      max_positions=self.max_positions, dropout=self.dropout, steps=self.steps,
                      batch_tokens=self.batch_tokens, lr=self.lr, min_lr=self.min_lr,
                      warmup=min(self.warmup, self.steps // 2), weight_decay=self.weight_decay,
                      alpha=self.alpha, temperature=self.temperature, kd=self.kd,
                      compact_vocab=self.compact_vocab)
        return TrainConfig(**{**budget, **run})
