"""The demo's config (``DemoConfig``) and the sizes it resolves to: the tuned defaults at ``--scale 1``, what
``--tiny`` and ``--gsm8k`` change, and the student each run trains (``pipeline.demo.budget``)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cache.util import UserError
from pipeline.demo.budget import StudentBudget
from pipeline.demo.stats import METHODS, WRITTEN

# Questions the teacher writes solutions for at --scale 1 (answers unused for keeping), samples per question,
# and the least vote share the majority answer needs (3 of 4).
WRITE_QUESTIONS = 10000
WRITE_SAMPLES = 4
WRITE_MIN_VOTE = 0.75
# The embedded default's data at --scale 1: training problems; held-out problems (every model's exact-answer
# accuracy is measured on all of them); the first VAL_PROBLEMS of those are the validation split (cache-test:
# per-token CE, KL and agreement at every evaluation point, which costs a forward pass per point, so fewer).
TRAIN_PROBLEMS = 1000
TEST_PROBLEMS = 600
VAL_PROBLEMS = 300


@dataclass
class DemoConfig:
    """One demo run. ``scale`` multiplies data sizes, student steps and evaluated problems."""

    out: Path
    scale: float = 1.0
    seed: int = 0
    seeds: int | None = None
    gsm8k: bool = False
    tiny: bool = False
    shared: Path | None = None
    steps: int | None = None
    batch_tokens: int | None = None
    eval_limit: int | None = None
    curve_problems: int | None = None
    max_new_tokens: int = 64
    topk: int = 32
    num_threads: int | None = 1
    jobs: int | None = None
    progress: bool = True
    write_questions: int | None = None
    write_samples: int = WRITE_SAMPLES
    write_min_vote: float = WRITE_MIN_VOTE
    write_temperature: float = 0.7
    student: StudentBudget = field(default_factory=StudentBudget)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.shared is not None:
            self.shared = Path(self.shared)
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise UserError(f"--scale {self.scale} must be a positive number (1 is the default budget)")
        if self.jobs is not None and self.jobs < 1:
            raise UserError(f"--jobs must be at least 1 (got {self.jobs}); 1 trains the students one by one")
        if self.seeds is not None and self.seeds < 1:
            raise UserError(f"--seeds must be at least 1 (got {self.seeds}); 3 gives a spread")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {self.steps})")
        if self.batch_tokens is not None and self.batch_tokens < self.max_length():
            raise UserError(f"--batch-tokens {self.batch_tokens} is below the longest sequence the demo's "
                            f"caches may hold ({self.max_length()} tokens); use at least {self.max_length()} "
                            f"(the default here is {self._sized_student().batch_tokens})")
        if self.eval_limit is not None and self.eval_limit < 0:
            raise UserError(f"--eval-limit must be >= 0 (0 skips the exact-answer evaluation; got "
                            f"{self.eval_limit})")
        if self.curve_problems is not None and self.curve_problems < 0:
            raise UserError(f"--curve-problems must be >= 0 (0: no accuracy curve; got "
                            f"{self.curve_problems})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.topk < 1:
            raise UserError(f"--topk must be at least 1 (got {self.topk})")
        if not 0.0 <= self.student.alpha < 1.0:
            raise UserError(f"--alpha {self.student.alpha} must be in [0, 1): the KD run needs a KD term "
                            "(the CE-only run uses alpha 1)")
        if not self.student.temperature > 0:
            raise UserError(f"--temperature {self.student.temperature} must be positive (1 is the default)")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; pass a folder for the demo outputs")
        if self.write_questions is not None and self.write_questions < 0:
            raise UserError(f"--write-questions must be >= 0 (0 leaves the teacher-written runs out; got "
                            f"{self.write_questions})")
        if self.write_samples < 1:
            raise UserError(f"--write-samples must be at least 1 (got {self.write_samples})")
        if not 0 <= self.write_min_vote <= 1:
            raise UserError(f"--write-min-vote must be a share in [0, 1] (got {self.write_min_vote})")

    # Resolved sizes: the defaults below are the tuned demo budget; --tiny and --gsm8k change them.

    def asset_scale(self) -> float:
        return 0.05 * self.scale if self.tiny else self.scale

    def resolved_jobs(self) -> int:
        """Students trained at the same time (one process each): default one per usable core, at most 2."""
        if self.jobs is not None:
            return self.jobs
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        return max(1, min(2, cores))

    def student_seeds(self) -> list[int]:
        n = self.seeds if self.seeds is not None else (2 if (self.tiny or self.gsm8k) else 3)
        return list(range(self.seed, self.seed + n))

    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        base = 12 if self.tiny else (60 if self.gsm8k else self.student.steps)
        return max(1, round(base * self.scale))

    def resolved_problems(self) -> tuple[int, int]:
        """(training, held-out) problems of the embedded default at this scale."""
        if self.tiny:
            return max(32, round(32 * self.scale)), max(16, round(16 * self.scale))
        return max(32, round(TRAIN_PROBLEMS * self.scale)), max(16, round(TEST_PROBLEMS * self.scale))

    def resolved_val_problems(self) -> int | None:
        """Held-out problems in the validation split (cache-test); None: the whole test split (--gsm8k)."""
        if self.gsm8k:
            return None
        n_test = self.resolved_problems()[1]
        return min(n_test, 12) if self.tiny else min(n_test, max(16, round(VAL_PROBLEMS * self.scale)))

    def resolved_eval_limit(self) -> int:
        if self.eval_limit is not None:
            return self.eval_limit
        if self.tiny:
            return max(1, round(4 * self.scale))
        if self.gsm8k:
            return max(1, round(8 * self.scale))
        return self.resolved_problems()[1]

    def resolved_curve_problems(self) -> int:
        n = self.curve_problems if self.curve_problems is not None else (
            2 if self.tiny else 4 if self.gsm8k else 100)
        return min(n, self.resolved_eval_limit())

    def _sized_student(self) -> StudentBudget:
        """The student and budget of this variant (``--tiny``, ``--gsm8k`` or the default), before the
        ``--batch-tokens`` and ``--steps`` given."""
        s = self.student
        if self.tiny:
            s = s.replace(hidden_size=32, layers=1, ffn=64, window=8, batch_tokens=2048, warmup=2,
                           eval_points=3)
        if self.gsm8k:
            s = s.replace(hidden_size=64, layers=2, ffn=256, window=16, batch_tokens=4096, warmup=5,
                           eval_points=2, compact_vocab=True, max_positions=640)
        return s

    def resolved_student(self) -> StudentBudget:
        s = self._sized_student()
        if self.batch_tokens is not None:  # given: over --tiny's and --gsm8k's sizes too
            s = s.replace(batch_tokens=self.batch_tokens)
        return s.replace(steps=self.resolved_steps())

    def resolved_write_questions(self) -> int:
        """Questions the teacher writes solutions for (0: no teacher-written runs; --gsm8k's random
        teacher writes nothing worth keeping)."""
        if self.write_questions is not None:
            return self.write_questions
        if self.gsm8k:
            return 0
        return max(16, round((48 if self.tiny else WRITE_QUESTIONS) * self.scale))

    def write_keep(self) -> str:
        """How written solutions are kept: self-consistency only; --tiny's barely trained teacher rarely
        agrees with itself, so there every solution that ended is kept (a smoke test of the path)."""
        return "all" if self.tiny else "majority"

    def methods(self) -> tuple[str, ...]:
        return (*METHODS, WRITTEN) if self.resolved_write_questions() else METHODS

    def max_length(self) -> int:
        return 640 if self.gsm8k else 256

    def resolved_max_new_tokens(self) -> int:
        return min(self.max_new_tokens, 48) if (self.tiny or self.gsm8k) else self.max_new_tokens

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["shared"] = str(self.out), None if self.shared is None else str(self.shared)
        d["student"] = self.student.to_json()
        d["resolved"] = {"asset_scale": self.asset_scale(), "student": self.resolved_student().to_json(),
                         "seeds": self.student_seeds(), "jobs": self.resolved_jobs(),
                         "problems": None if self.gsm8k else list(self.resolved_problems()),
                         "val_problems": self.resolved_val_problems(),
                         "eval_limit": self.resolved_eval_limit(),
                         "curve_problems": self.resolved_curve_problems(),
                         "write_questions": self.resolved_write_questions(), "write_keep": self.write_keep(),
                         "max_new_tokens": self.resolved_max_new_tokens()}
        return d
