"""``fnet-distill demo``: the whole pipeline end to end, then a KD-vs-CE report over several student seeds.

Stages, each with its own folder under ``out``:

1. ``assets/``: data, tokenizer and teacher. The embedded default (``pipeline.demo.build_demo_assets``: the
   shipped teacher when its fingerprint matches, else trained), or with ``gsm8k=True`` a GSM8K slice + the
   real Qwen2 tokenizer from ``shared`` + a small random-init Qwen2 teacher (a smoke test of the real path).
   Reused while their settings are unchanged.
2. ``cache-train/``, ``cache-test/``: ``run_teacher_cache`` on both splits (fingerprinted; a finished cache of
   the same fingerprint is reused, one of another fingerprint is rebuilt).
3. ``student-kd-s<seed>/``, ``student-ce-s<seed>/`` for each student seed: ``train_student`` with the same
   student, steps, data order, initialisation (the seed) and learning rate; only ``alpha`` differs (CE-only is
   ``alpha = 1``). At every evaluation point the checkpoint also answers the first ``curve_problems`` test
   problems (``exact.jsonl``), so accuracy has a curve. Always retrained.
4. ``eval-teacher.jsonl``, ``eval-{kd,ce}-s<seed>.jsonl``: greedy exact-answer accuracy on the test split
   (``evaluate_model``).
5. ``report.md``, ``report.json``, ``curves.png``: per-seed rows, mean and spread per method, paired KD - CE
   differences, the share of the CE-only-to-teacher gap KD closes, the step at which KD reaches CE-only's
   final validation CE, and the acceptance verdict.

Validation metrics are the training loop's evaluations on ``cache-test`` (label CE, KL(teacher || student)
at T = 1 over top-k + tail, top-1 agreement with the teacher). The teacher's row is its own label CE on the
same supervised tokens (KL 0 and agreement 1 by definition).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cache.device import machine_info
from cache.util import (
    UserError,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    file_hash,
    json_hash,
    lock_run_folder,
)
from pipeline.demo.budget import StudentBudget

Log = Callable[[str], None]

GSM8K_MARKER = "gsm8k_assets.json"
GSM8K_RECIPE_VERSION = 1
METHODS = ("kd", "ce")
WRITTEN = "kdw"  # KD on the teacher-written solutions plus the reference answers
METHOD_NAMES = {"teacher": "teacher", "kd": "KD", "ce": "CE only", WRITTEN: "KD + teacher-written"}
# Questions the teacher writes solutions for at --scale 1 (answers unused for keeping), samples per question,
# and the least vote share the majority answer needs (3 of 4).
WRITE_QUESTIONS = 10000
WRITE_SAMPLES = 4
WRITE_MIN_VOTE = 0.75
BOOTSTRAP = 2000
# The per-run metrics the report summarises (mean and spread over seeds, paired KD - CE differences).
RUN_METRICS = ("strict_acc", "flexible_acc", "val_ce", "val_kl", "val_top1_agree")
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

    def resolved_student(self) -> StudentBudget:
        s = self.student
        if self.tiny:
            s = replace(s, hidden_size=32, layers=1, ffn=64, window=8, batch_tokens=2048, warmup=2,
                        eval_points=3)
        if self.gsm8k:
            s = replace(s, hidden_size=64, layers=2, ffn=256, window=16, batch_tokens=4096, warmup=5,
                        eval_points=2, compact_vocab=True, max_positions=640)
        return replace(s, steps=self.resolved_steps())

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
        d["resolved"] = {"asset_scale": self.asset_scale(), "student": asdict(self.resolved_student()),
                         "seeds": self.student_seeds(), "jobs": self.resolved_jobs(),
                         "problems": None if self.gsm8k else list(self.resolved_problems()),
                         "val_problems": self.resolved_val_problems(),
                         "eval_limit": self.resolved_eval_limit(),
                         "curve_problems": self.resolved_curve_problems(),
                         "write_questions": self.resolved_write_questions(), "write_keep": self.write_keep(),
                         "max_new_tokens": self.resolved_max_new_tokens()}
        return d


@dataclass(frozen=True)
class Assets:
    data_dir: Path  # holds train.jsonl and test.jsonl
    tokenizer_dir: Path
    teacher_dir: Path
    info: dict


# ------------------------------------------------------------------------------------------------ assets


def embedded_assets(cfg: DemoConfig, log: Log) -> Assets:
    from pipeline.demo import build_demo_assets

    n_train, n_test = cfg.resolved_problems()
    a = build_demo_assets(cfg.out / "assets", scale=cfg.asset_scale(), seed=cfg.seed, n_train=n_train,
                          n_test=n_test, tiny=cfg.tiny, log=log)
    t = a.stats["teacher"]
    info = {"kind": "embedded", "reused": a.stats["reused"], "key": a.stats["key"],
            "tokenizer_vocab": a.stats["tokenizer_vocab"], "teacher_parameters": t["parameters"],
            "teacher_source": a.stats["teacher_source"],
            "teacher_source_reason": a.stats["teacher_source_reason"],
            "teacher_val_ce_at_build": t["val"]["ce"], "uniform_ce": t["uniform_ce"],
            "teacher_train_steps": t["config"]["steps"], "teacher_train_wall_s": t.get("wall_s"),
            "build_wall_s": a.stats["wall_s"]}
    return Assets(a.train_jsonl.parent, a.tokenizer_dir, a.teacher_dir, info)


def gsm8k_sources(shared: Path | None) -> tuple[Path, Path]:
    """(Qwen2 tokenizer folder, GSM8K folder with train.jsonl/test.jsonl) under ``shared``."""
    root = Path(shared) if shared is not None else Path(os.environ.get(
        "FNET_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
    tok, data = root / "tokenizers" / "qwen2", root / "data" / "gsm8k"
    missing = [str(p) for p in (tok / "tokenizer_config.json", data / "train.jsonl", data / "test.jsonl")
               if not p.is_file()]
    if missing:
        raise UserError(f"--gsm8k needs a Qwen2 tokenizer and GSM8K files under {root} (missing: "
                        f"{', '.join(missing)}); pass --shared DIR holding tokenizers/qwen2/ and "
                        "data/gsm8k/{train,test}.jsonl")
    return tok, data


def _head_lines(path: Path, n: int) -> list[str]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(line if line.endswith("\n") else line + "\n")
                if len(out) == n:
                    break
    return out


def random_qwen2_teacher(tokenizer: Any, out_dir: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                         embed_gain: float = 30.0, max_positions: int = 1024) -> int:
    """Save a random-init ``Qwen2ForCausalLM`` over the tokenizer's vocabulary (its embedding enlarged so the
    next-token distributions are peaked, like a trained LM's, rather than near uniform). Returns its size."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    vocab = max(len(tokenizer), int(getattr(tokenizer, "vocab_size", 0) or 0))
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_gain)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def gsm8k_assets(cfg: DemoConfig, log: Log) -> Assets:
    """A GSM8K slice + the real Qwen2 tokenizer + a random-init Qwen2 teacher, reused by a content key."""
    from pipeline.data import load_tokenizer

    tok_src, data_src = gsm8k_sources(cfg.shared)
    scale = cfg.asset_scale()
    n_train, n_test = max(16, round(200 * scale)), max(8, round(40 * scale))
    settings = {"recipe_version": GSM8K_RECIPE_VERSION, "seed": cfg.seed, "n_train": n_train,
                "n_test": n_test,
                "tokenizer_hash": (file_hash(tok_src / "tokenizer.json")
                                   if (tok_src / "tokenizer.json").is_file() else str(tok_src)),
                "train_hash": file_hash(data_src / "train.jsonl"),
                "test_hash": file_hash(data_src / "test.jsonl")}
    key = json_hash(settings)
    out = (cfg.out / "assets").resolve()
    paths = (out / "data", out / "tokenizer", out / "teacher")
    try:
        marker = json.loads((out / GSM8K_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if marker is not None and marker.get("key") == key and all(p.exists() for p in paths):
        log(f"gsm8k assets reused from {out}")
        return Assets(*paths, {**marker["info"], "reused": True})
    if out.exists() and marker is None and any(out.iterdir()):
        raise UserError(f"{out} exists and does not hold demo assets; pass another --out or remove it")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-{os.getpid()}-", dir=out.parent))
    try:
        (tmp / "data").mkdir()
        for split, n in (("train", n_train), ("test", n_test)):
            atomic_write_bytes(tmp / "data" / f"{split}.jsonl",
                               "".join(_head_lines(data_src / f"{split}.jsonl", n)).encode())
        tokenizer = load_tokenizer(str(tok_src))
        tokenizer.save_pretrained(tmp / "tokenizer")
        params = random_qwen2_teacher(tokenizer, tmp / "teacher", seed=cfg.seed)
        info = {"kind": "gsm8k", "key": key, "settings": settings, "tokenizer_vocab": len(tokenizer),
                "teacher_parameters": params, "build_wall_s": time.perf_counter() - t0,
                "note": "random-init teacher: a smoke test of the real path, not a distillation result"}
        atomic_write_json(tmp / GSM8K_MARKER, {"key": key, "info": info})
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"gsm8k assets: {n_train} train / {n_test} test rows, Qwen2 tokenizer ({len(tokenizer)} tokens), "
        f"random teacher ({params:,} parameters)")
    return Assets(*paths, {**info, "reused": False})



# ------------------------------------------------------------------------------------------------ stages


def cache_or_rebuild(tc: Any, log: Log) -> dict[str, Any]:
    """``run_teacher_cache(tc)``; a folder made with other settings (an earlier demo's) is rebuilt."""
    from cache.schema import FingerprintMismatch
    from pipeline.teacher_cache import run_teacher_cache

    try:
        return run_teacher_cache(tc)
    except FingerprintMismatch:
        log(f"{tc.out} was made with other settings; rebuilding it")
        shutil.rmtree(tc.out)
        return run_teacher_cache(tc)


def teacher_cache_stage(cfg: DemoConfig, assets: Assets, split: str, temperatures: tuple[float, ...],
                        log: Log) -> dict[str, Any]:
    """Stage one on one split into ``out/cache-<split>``; a cache of another fingerprint is rebuilt."""
    from pipeline.teacher_cache import TeacherCacheConfig

    out = cfg.out / f"cache-{split}"
    tc = TeacherCacheConfig(teacher=str(assets.teacher_dir), dataset=str(assets.data_dir), split=split,
                            out=out, topk=cfg.topk, temperatures=temperatures, max_length=cfg.max_length(),
                            batch_tokens=8192, device="cpu", unit_size=512, seed=cfg.seed,
                            limit=cfg.resolved_val_problems() if split == "test" else None,
                            progress=cfg.progress)
    summary = cache_or_rebuild(tc, log)
    log(f"cache-{split}: {summary['sequences']} sequences, {summary['tokens']:,} tokens, "
        f"{summary['bytes_per_token']:.1f} bytes/token ({summary['units_skipped']} of "
        f"{summary['units_total']} units reused)")
    return summary


def written_stage(cfg: DemoConfig, assets: Assets, temperatures: tuple[float, ...],
                  log: Log) -> dict[str, Any]:
    """The teacher writes ``write_samples`` solutions to each of ``resolved_write_questions()`` new
    questions (none held out, none of the students' training split) into ``out/cache-written``, kept by
    self-consistency only: the file holds the generator's answers so that the report can measure the
    teacher's accuracy on what it wrote, but ``--keep majority`` never reads them."""
    from pipeline.data import load_examples
    from pipeline.demo.problems import written_questions
    from pipeline.teacher_cache import TeacherCacheConfig

    n = cfg.resolved_write_questions()
    train_questions = {ex.question for ex in load_examples(str(assets.data_dir), "train")}
    path = cfg.out / "written-questions.jsonl"
    rows = written_questions(n, cfg.seed, exclude=train_questions)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if not path.exists() or path.read_bytes() != body:  # unchanged: the written cache's input stays as is
        atomic_write_bytes(path, body)
    out = cfg.out / "cache-written"
    tc = TeacherCacheConfig(teacher=str(assets.teacher_dir), dataset=str(path), out=out, topk=cfg.topk,
                            temperatures=temperatures, max_length=cfg.max_length(), batch_tokens=8192,
                            device="cpu", unit_size=512, seed=cfg.seed, progress=cfg.progress,
                            write=cfg.write_samples, write_max_tokens=cfg.resolved_max_new_tokens(),
                            write_temperature=cfg.write_temperature,
                            keep=cfg.write_keep(), min_vote=cfg.write_min_vote)
    summary = cache_or_rebuild(tc, log)
    w = summary["written"]
    rows_path = out / "provenance" / "rows.jsonl"
    kept = [json.loads(x) for x in rows_path.read_text().splitlines()]
    summary["kept_correct"] = sum(bool(r["correct"]) for r in kept)
    log(f"cache-written: the teacher wrote {w['samples']:,} solutions to {w['questions']:,} questions "
        f"({w['teacher_accuracy']:.1%} correct), kept {w['kept']:,} "
        f"({summary['kept_correct'] / max(1, len(kept)):.1%} of them correct), "
        f"{summary['bytes_per_token']:.1f} bytes/token")
    return summary


def run_name(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def student_and_eval(cfg: DemoConfig, assets: Assets, method: str, seed: int, log: Log) -> dict[str, Any]:
    """Train one student, then measure its exact-answer accuracy (``eval_stage``) in the same process."""
    trained = student_stage(cfg, assets, method, seed, log)
    t0 = time.perf_counter()
    exact = eval_stage(cfg, assets, run_name(method, seed), Path(trained["out"]) / "final")
    return {**trained, "exact": exact, "eval_wall_s": time.perf_counter() - t0}


def _student_job(cfg: DemoConfig, assets: Assets, method: str, seed: int) -> dict[str, Any]:
    """One student run and its eval in a worker process (its own torch thread count; log lines to stderr)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a spawned worker does not inherit the command's setting
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    return student_and_eval(cfg, assets, method, seed, lambda msg: print(msg, file=sys.stderr, flush=True))


def train_students(cfg: DemoConfig, assets: Assets, jobs: list[tuple[str, int]], log: Log,
                   alongside: Callable[[], Any] | None = None) -> tuple[dict[str, dict[str, Any]], Any]:
    """Train and evaluate every (method, seed) run, ``cfg.resolved_jobs()`` processes at a time (1: in this
    process, one after the other). ``alongside`` (the teacher's measurements) runs in this process while
    the workers train, so no core waits for it; returns (runs by name, what ``alongside`` returned).

    The runs are independent (each its own seed, folder and data order), so running them side by side only
    changes wall time; progress bars are off in the workers so that their log lines stay readable."""
    n = min(cfg.resolved_jobs(), len(jobs))
    if n <= 1:
        done = {run_name(m, sd): student_and_eval(cfg, assets, m, sd, log) for m, sd in jobs}
        return done, (alongside() if alongside is not None else None)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    quiet = replace(cfg, progress=False)
    log(f"training {len(jobs)} students, {n} at a time (one process each); each answers the test problems "
        "when it is done")
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {run_name(m, sd): pool.submit(_student_job, quiet, assets, m, sd) for m, sd in jobs}
        extra = alongside() if alongside is not None else None
        return {name: f.result() for name, f in futures.items()}, extra


def student_stage(cfg: DemoConfig, assets: Assets, method: str, seed: int, log: Log) -> dict[str, Any]:
    """Train one student into ``out/student-<method>-s<seed>`` from scratch (an old folder is replaced).

    At every intermediate evaluation the checkpoint answers the first ``curve_problems`` test problems;
    ``exact.jsonl`` in the folder holds one line per point."""
    from pipeline.evaluate import evaluate_model
    from student.train import CHECKPOINT, TrainHooks, train_student

    s = cfg.resolved_student()
    name = run_name(method, seed)
    out = cfg.out / f"student-{name}"
    shutil.rmtree(out, ignore_errors=True)
    eval_every = max(1, s.steps // max(1, s.eval_points))
    alpha = 1.0 if method == "ce" else s.alpha
    mix = (cfg.out / "cache-written",) if method == WRITTEN else ()
    tc = s.train_config(cache=cfg.out / "cache-train", mix_caches=mix, val_cache=cfg.out / "cache-test",
                        out=out, alpha=alpha,
                        eval_every=eval_every, save_every=eval_every,
                        log_every=max(1, min(10, s.steps // 20)), seed=seed, device="cpu", num_workers=0,
                        progress=cfg.progress)
    n_curve = cfg.resolved_curve_problems()
    exact_rows: list[dict[str, Any]] = []

    def answer(step: int) -> None:
        if n_curve and step % eval_every == 0 and step < s.steps:
            r = evaluate_model(out / CHECKPOINT, str(assets.data_dir), "test", n_curve,
                               max_new_tokens=cfg.resolved_max_new_tokens(), batch_size=50, device="cpu",
                               dtype="float32", progress=False)
            exact_rows.append({"step": step, "n": r.n, "strict_correct": r.strict_correct,
                               "flexible_correct": r.flexible_correct})

    result = train_student(tc, TrainHooks(after_step=answer))
    m = result.final_metrics
    log(f"student-{name}: {m['step']} steps in {result.wall_s:.1f}s, val CE "
        f"{m.get('val_ce', float('nan')):.4f}, val KL {m.get('val_kl', float('nan')):.4f}")
    return {"out": str(out), "method": method, "seed": seed, "alpha": alpha, "train_config": tc.to_json(),
            "final": m, "curve_exact": exact_rows}


def teacher_label_ce(assets: Assets, split: str, max_length: int, limit: int | None = None) -> dict[str, Any]:
    """The teacher's own CE (nats per supervised token), perplexity and top-1 accuracy on a split's labels
    (its first ``limit`` rows), on the same chat-formatted, assistant-only supervised tokens as the cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data import load_examples, load_tokenizer
    from pipeline.demo.teacher import encode_chat_rows, evaluate_teacher

    tokenizer = load_tokenizer(str(assets.teacher_dir))
    rows = [{"question": ex.question, "answer": ex.answer}
            for ex in load_examples(str(assets.data_dir), split, limit=limit)]
    model = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    return evaluate_teacher(model, encode_chat_rows(tokenizer, rows, max_length), tokenizer.pad_token_id,
                            batch_size=16)


def eval_stage(cfg: DemoConfig, assets: Assets, name: str, model_dir: Path) -> dict[str, Any] | None:
    from pipeline.evaluate import evaluate_model

    n = cfg.resolved_eval_limit()
    if n == 0:
        return None
    r = evaluate_model(model_dir, str(assets.data_dir), "test", n,
                       max_new_tokens=cfg.resolved_max_new_tokens(), batch_size=50, device="cpu",
                       dtype="float32", out=cfg.out / f"eval-{name}.jsonl", progress=cfg.progress)
    return r.to_json()


# ------------------------------------------------------------------------------------------------ report


def _metrics_rows(student_dir: Path) -> list[dict[str, Any]]:
    path = student_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _eval_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "values": vals, "n": len(vals)}


def kd_reaches_step(kd_dir: Path, target: float) -> int | None:
    """The first evaluation step at which the KD run's validation CE is at or below ``target``."""
    for r in _metrics_rows(kd_dir):
        if r.get("event") == "eval" and r.get("val_ce") is not None and r["val_ce"] <= target:
            return int(r["step"])
    return None


def curve_points(run: dict[str, Any], eval_file: Path | None, n_curve: int) -> dict[str, list]:
    """Validation CE and exact-answer accuracy (first ``n_curve`` test problems) against steps for one run;
    the final point of the accuracy curve is read from the final evaluation's records."""
    rows = [r for r in _metrics_rows(Path(run["out"])) if r.get("event") == "eval"]
    ce = [(int(r["step"]), float(r["val_ce"])) for r in rows if r.get("val_ce") is not None]
    acc = [(r["step"], r["strict_correct"] / r["n"]) for r in run["curve_exact"] if r["n"]]
    if eval_file is not None and n_curve:
        rec = _eval_records(eval_file)[:n_curve]
        acc.append((int(run["final"]["step"]), sum(r["strict_correct"] for r in rec) / len(rec)))
    return {"val_ce": ce, "strict_acc": acc}


def build_summary(teacher: dict[str, Any], runs: dict[str, dict[str, Any]],
                  seeds: list[int]) -> dict[str, Any]:
    """Per-method mean/spread, paired KD - CE differences, gap closed, KD-reaches-CE step, verdict."""
    methods = [m for m in (*METHODS, WRITTEN) if all(run_name(m, sd) in runs for sd in seeds)]
    per = {m: {k: spread([runs[run_name(m, s)][k] for s in seeds]) for k in RUN_METRICS
               if all(runs[run_name(m, s)][k] is not None for s in seeds)} for m in methods}

    def paired_diff(a: str, b: str) -> dict[str, Any]:
        """Per metric, the spread of method a's value minus method b's on the same seed."""
        return {k: spread([runs[run_name(a, s)][k] - runs[run_name(b, s)][k] for s in seeds])
                for k in RUN_METRICS if k in per[a] and k in per[b]}

    paired = paired_diff("kd", "ce")
    gap = [(runs[run_name("ce", s)]["val_ce"] - runs[run_name("kd", s)]["val_ce"])
           / (runs[run_name("ce", s)]["val_ce"] - teacher["val_ce"]) for s in seeds]
    reach = {s: runs[run_name("kd", s)]["kd_reaches_ce_final_step"] for s in seeds}
    verdict: dict[str, Any] = {}
    if "strict_acc" in paired:
        kd, ce = per["kd"]["strict_acc"], per["ce"]["strict_acc"]
        margin = max(kd["std"], ce["std"])
        verdict["exact_answer"] = {"kd_minus_ce": kd["mean"] - ce["mean"], "seed_spread": margin,
                                   "pass": kd["mean"] - ce["mean"] > margin}
    for k in ("val_ce", "val_kl"):
        verdict[k] = {"kd_minus_ce": paired[k]["mean"], "kd_better_every_seed": paired[k]["max"] < 0,
                      "pass": per["kd"][k]["mean"] < per["ce"][k]["mean"]}
    verdict["pass"] = all(v["pass"] for v in verdict.values())
    out = {"methods": per, "paired_kd_minus_ce": paired, "gap_closed": spread(gap),
           "kd_reaches_ce_final_val_ce_step": reach, "verdict": verdict}
    if WRITTEN in per:
        out["paired_written"] = {other: paired_diff(WRITTEN, other) for other in METHODS}
    return out


def paired_bootstrap(a: list[list[bool]], b: list[list[bool]], n: int, *, draws: int = BOOTSTRAP,
                     seed: int = 0) -> dict[str, float]:
    """Mean over seeds of accuracy(a) - accuracy(b) on the first ``n`` problems, with a 95% interval from a
    paired bootstrap over problems: the same resampled problems for every seed and both methods, so the
    interval covers the problem sample (seeds are summarised separately by their spread). ``a[s][i]``: seed
    s answered problem i correctly."""
    import numpy as np

    x = np.asarray([row[:n] for row in a], dtype=np.float64).mean(0)  # (n,) mean over seeds
    y = np.asarray([row[:n] for row in b], dtype=np.float64).mean(0)
    d = x - y
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    boot = d[idx].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"n": n, "diff": float(d.mean()), "lo": float(lo), "hi": float(hi)}


def written_verdict(summary: dict[str, Any], correct: dict[str, list[bool]], seeds: list[int],
                    checkpoints: list[int]) -> dict[str, Any]:
    """KD on teacher-written data against KD on references and against CE only: the paired mean difference
    of exact answers, the seed spread, and a paired bootstrap interval over problems at every number of
    held-out problems in ``checkpoints``. The goal: at least 10 points and more than three seed spreads
    over KD on references, more over CE only, with the interval above 0 at every number."""
    per = summary["methods"]
    out: dict[str, Any] = {}
    for other, goal in (("kd", 0.10), ("ce", None)):
        if "strict_acc" not in per.get(WRITTEN, {}) or "strict_acc" not in per.get(other, {}):
            continue
        a, b = per[WRITTEN]["strict_acc"], per[other]["strict_acc"]
        diff = a["mean"] - b["mean"]
        spread_ = max(a["std"], b["std"])
        at = [paired_bootstrap([correct[run_name(WRITTEN, s)] for s in seeds],
                               [correct[run_name(other, s)] for s in seeds], n, seed=n) for n in checkpoints]
        v = {"diff": diff, "seed_spread": spread_, "by_problems": at, "interval_above_zero_everywhere":
             all(x["lo"] > 0 for x in at)}
        if goal is not None:
            v["goal"] = goal
            v["pass"] = diff >= goal and diff > 3 * spread_ and v["interval_above_zero_everywhere"]
        out[other] = v
    if "kd" in out and "ce" in out:
        ce = out["ce"]
        ce["pass"] = ce["diff"] > out["kd"]["diff"] and ce["interval_above_zero_everywhere"]
        out["pass"] = out["kd"]["pass"] and out["ce"]["pass"]
    return out


def problem_checkpoints(n: int) -> list[int]:
    """The numbers of held-out problems the report checks the verdict at: every 100 (fewer for small
    runs) up to ``n``."""
    step = 100 if n >= 300 else max(1, n // 3)
    return sorted({*range(step, n + 1, step), n})


def _band(ax, points_by_seed: list[list[tuple[float, float]]], color: str, label: str) -> None:
    """Thin line per seed, and the mean over seeds with a min-max band where every seed has the step."""
    for pts in points_by_seed:
        if pts:
            ax.plot(*zip(*pts), "-", color=color, alpha=0.3, lw=0.8)
    common = sorted(set.intersection(*(set(x for x, _ in pts) for pts in points_by_seed))) \
        if points_by_seed else []
    if not common:
        return
    ys = [[dict(pts)[x] for pts in points_by_seed] for x in common]
    ax.plot(common, [statistics.fmean(y) for y in ys], "o-", color=color, lw=2, ms=3,
            label=f"{label} (mean of {len(points_by_seed)})")
    ax.fill_between(common, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.15)


def plot_curves(curves: dict[str, list[dict[str, list]]], teacher: dict[str, Any], png: Path,
                title: str) -> None:
    """2 x 2: validation CE and exact-answer accuracy against steps (per seed thin, mean with a min-max
    band, the teacher dashed), and the paired KD - CE difference of each (per seed and mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    colors = {"kd": "tab:blue", "ce": "tab:orange", WRITTEN: "tab:purple"}
    panels = (("val_ce", "validation label CE (nats / supervised token)", teacher.get("val_ce")),
              ("strict_acc", "exact-answer accuracy (strict, first test problems)",
               teacher.get("strict_acc")))
    for col, (key, ylabel, t_value) in enumerate(panels):
        ax, dax = axes[0, col], axes[1, col]
        for m in [m for m in (*METHODS, WRITTEN) if m in curves]:
            _band(ax, [c[key] for c in curves[m]], colors[m], METHOD_NAMES[m])
        if t_value is not None:
            ax.axhline(t_value, color="gray", ls="--", lw=1.2, label="teacher")
        if key == "val_ce":
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        for m, color in (("kd", "tab:green"), (WRITTEN, "tab:purple")):
            if m not in curves:
                continue
            diffs = []
            for kd, ce in zip(curves[m], curves["ce"]):
                ce_at = dict(ce[key])
                diffs.append([(x, y - ce_at[x]) for x, y in kd[key] if x in ce_at])
            _band(dax, diffs, color, f"{METHOD_NAMES[m]} - CE only")
        dax.axhline(0.0, color="black", lw=0.8)
        dax.set_ylabel(f"minus CE only: {'val CE' if key == 'val_ce' else 'accuracy'}"
                       f" ({'lower' if key == 'val_ce' else 'higher'} is better for KD)")
        dax.set_xlabel("optimizer step")
        dax.grid(alpha=0.3)
        if dax.get_legend_handles_labels()[0]:
            dax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _pm(d: dict[str, Any] | None, spec: str, scale: float = 1.0) -> str:
    if d is None:
        return "n/a"
    return f"{format(d['mean'] * scale, spec)} ± {format(d['std'] * scale, spec.lstrip('+'))}"


def _acc(e: dict[str, Any] | None, key: str) -> str:
    if e is None:
        return "not run"
    return f"{e[key]:.1%} ({e[key.replace('_acc', '_correct')]}/{e['n']})"


def _size_ratio(teacher: int, student: int) -> str:
    """``5.8x fewer`` than the teacher, or ``1.1x more`` when the student is the larger one (--tiny)."""
    return f"{teacher / student:.1f}x fewer" if teacher >= student else f"{student / teacher:.1f}x more"


def written_section(report: dict[str, Any]) -> list[str]:
    """What the teacher wrote and kept, and the verdict of KD on it against KD on references and CE only,
    with paired bootstrap intervals at every number of held-out problems."""
    c = report["caches"].get("written")
    wv = report["summary"].get("written_verdict")
    if c is None:
        return []
    w = c["written"]
    n_kept = c["sequences"]
    lines = ["", f"**Teacher-written data.** The teacher wrote {w['samples']:,} solutions "
             f"({w['new_tokens']:,} tokens) to {w['questions']:,} new questions "
             f"({report['config']['write_samples']} each, T {report['config']['write_temperature']:g}, "
             f"top-p 0.95) and {n_kept:,} were kept "
             + ("by self-consistency alone: the final answer agrees with the unique majority of the "
                f"question's samples, with at least {report['config']['write_min_vote']:.0%} of the votes, "
                f"exact duplicates dropped ({w['questions_kept']:,} questions kept, {w['ties']:,} tied)"
                if report["config"]["resolved"].get("write_keep") == "majority" else
                "(every solution that ended, exact duplicates dropped: --tiny's teacher is barely trained)")
             + ". The generator knows the answers (never used to keep): the teacher's samples are "
             f"{w['teacher_accuracy']:.1%} correct, the kept ones {c['kept_correct'] / max(1, n_kept):.1%}. "
             f"The {METHOD_NAMES[WRITTEN]} students train on these {n_kept:,} solutions plus the "
             f"{report['data']['train']:,} reference answers, with the same steps and seeds."]
    if wv:
        def row(other: str) -> str:
            v = wv[other]
            cells = [f"{x['diff'] * 100:+.1f} [{x['lo'] * 100:+.1f}, {x['hi'] * 100:+.1f}]"
                     for x in v["by_problems"]]
            return f"| {METHOD_NAMES[WRITTEN]} - {METHOD_NAMES[other]} | " + " | ".join(cells) + " |"

        ns = [x["n"] for x in wv["kd"]["by_problems"]]
        k, ce = wv["kd"], wv["ce"]
        lines += ["", f"**Verdict (teacher-written).** {METHOD_NAMES[WRITTEN]} beats KD on references by "
                  f"{k['diff'] * 100:+.1f} points against a seed spread of {k['seed_spread'] * 100:.1f} "
                  f"(goal: >= {k['goal'] * 100:.0f} points and > 3 spreads, the interval above 0 at every "
                  f"number of problems): **{'yes' if k['pass'] else 'no'}**; it beats CE only by "
                  f"{ce['diff'] * 100:+.1f} points (more than KD on references does: "
                  f"**{'yes' if ce['pass'] else 'no'}**).", "",
                  "Paired difference of exact answers (points, mean over seeds) on the first N held-out "
                  f"problems, with a 95% paired bootstrap interval over problems ({BOOTSTRAP} draws):", "",
                  "| N | " + " | ".join(map(str, ns)) + " |", "|---|" + "---|" * len(ns),
                  row("kd"), row("ce")]
    return lines


def render_report(report: dict[str, Any]) -> str:
    """The markdown report: teacher, per-method mean ± spread, per-seed rows, paired differences, verdict,
    wall time per stage, cache sizes, machine."""
    t, sm, s = report["teacher"], report["summary"], report["config"]["resolved"]["student"]
    seeds = report["config"]["resolved"]["seeds"]
    a = report["assets"]
    lines = [f"# fnet-distill demo report ({report['variant']})", "",
             f"Teacher: Qwen2 ({a['teacher_parameters']:,} parameters, {a.get('teacher_source', 'built')}); "
             f"student: causal STFT FNet ({report['student_parameters']:,} parameters, "
             f"{_size_ratio(a['teacher_parameters'], report['student_parameters'])}; d={s['hidden_size']}, "
             f"{s['layers']} layer{'s' if s['layers'] != 1 else ''}, FFN {s['ffn']}, W={s['window']}, "
             "receptive field "
             f"{s['layers'] * (s['window'] - 1) + 1} tokens). {report['data']['train']:,} training problems, "
             f"{s['steps']} steps of <= {s['batch_tokens']} tokens ({report['data']['epochs']:.1f} epochs), "
             f"lr {s['lr']:g}; KD = `{s['kd']}` from the cache (top-{report['config']['topk']} + tail), "
             f"alpha {s['alpha']:g}, T {s['temperature']:g}; CE only = alpha 1. Student seeds "
             f"{', '.join(map(str, seeds))}: per seed the KD and CE-only runs share initialisation and data "
             "order.", "",
             f"Exact answer on {t['exact']['n'] if t['exact'] else 0} held-out problems; ± is the standard "
             "deviation over seeds.", "",
             "| model | exact answer (strict `#### N`) | exact answer (last number) | val CE (nats/token) "
             "| KL to teacher (T=1) | top-1 agreement |",
             "|---|---|---|---|---|---|",
             f"| teacher | {_acc(t['exact'], 'strict_acc')} | {_acc(t['exact'], 'flexible_acc')} | "
             f"{_fmt(t['val_ce'], '.4f')} | 0 | 100% |"]
    methods = report.get("methods", list(METHODS))
    for m in ([WRITTEN] if WRITTEN in methods else []) + list(METHODS):
        p = sm["methods"][m]
        lines.append(f"| {METHOD_NAMES[m]} student ({len(seeds)} seeds) | "
                     f"{_pm(p.get('strict_acc'), '.1f', 100)}% "
                     f"| {_pm(p.get('flexible_acc'), '.1f', 100)}% | {_pm(p.get('val_ce'), '.4f')} | "
                     f"{_pm(p.get('val_kl'), '.4f')} | {_pm(p.get('val_top1_agree'), '.1f', 100)}% |")
    pairs = [("KD - CE only", sm["paired_kd_minus_ce"])]
    if "paired_written" in sm:
        pairs = [(f"{METHOD_NAMES[WRITTEN]} - KD", sm["paired_written"]["kd"]),
                 (f"{METHOD_NAMES[WRITTEN]} - CE only", sm["paired_written"]["ce"])] + pairs
    for label, d in pairs:
        lines.append(f"| {label} (paired) | {_pm(d.get('strict_acc'), '+.1f', 100)} pts | "
                     f"{_pm(d.get('flexible_acc'), '+.1f', 100)} pts | {_pm(d.get('val_ce'), '+.4f')} | "
                     f"{_pm(d.get('val_kl'), '+.4f')} | {_pm(d.get('val_top1_agree'), '+.1f', 100)} pts |")
    lines += written_section(report)
    v = sm["verdict"]
    g = sm["gap_closed"]
    reach = sm["kd_reaches_ce_final_val_ce_step"]
    lines += ["", "**Verdict.** " + " ".join(filter(None, [
        (f"KD beats CE only on exact answers by {v['exact_answer']['kd_minus_ce'] * 100:+.1f} points "
         "against a "
         f"seed spread of {v['exact_answer']['seed_spread'] * 100:.1f}: "
         f"**{'yes' if v['exact_answer']['pass'] else 'no'}**.") if "exact_answer" in v else None,
        f"On validation CE ({v['val_ce']['kd_minus_ce']:+.4f}): "
        f"**{'yes' if v['val_ce']['pass'] else 'no'}**; "
        f"on KL to the teacher ({v['val_kl']['kd_minus_ce']:+.4f}): "
        f"**{'yes' if v['val_kl']['pass'] else 'no'}**.",
        f"KD closes {g['mean']:.0%} ± {g['std']:.0%} of the CE-only-to-teacher validation-CE gap.",
        "KD reaches CE only's final validation CE at step " + ", ".join(
            f"{'never' if st is None else st} (seed {sd})" for sd, st in reach.items())
        + f" of {s['steps']}.",
    ])), "", "Per seed:", "",
        "| run | seed | exact (strict) | exact (last number) | val CE | KL to teacher | top-1 agreement |",
        "|---|---|---|---|---|---|---|"]
    for sd in seeds:
        for m in methods:
            r = report["runs"][run_name(m, sd)]
            lines.append(f"| {METHOD_NAMES[m]} | {sd} | {_acc(r['exact'], 'strict_acc')} | "
                         f"{_acc(r['exact'], 'flexible_acc')} | {_fmt(r['val_ce'], '.4f')} | "
                         f"{_fmt(r['val_kl'], '.4f')} | {_fmt(r['val_top1_agree'], '.2%')} |")
    n_val = report["config"]["resolved"].get("val_problems")
    lines += ["", f"Validation: {report['teacher']['val_tokens']:,} supervised tokens of "
              + ("the test split" if n_val is None else f"the first {n_val:,} test problems") + ". "
              "Curves: `curves.png`.", "",
              "| stage | wall time (s) |", "|---|---|"]
    for stage, sec in report["wall_s"].items():
        lines.append(f"| {stage} | {sec:.1f} |")
    for job, sec in report.get("jobs_wall_s", {}).items():
        lines.append(f"| &nbsp;&nbsp;{job} | {sec:.1f} |")
    if report.get("jobs_wall_s"):
        lines += ["", "Indented rows ran inside the students stage, in parallel (the teacher's in the main "
                  "process while the students trained), so they add up to more than it."]
    c = report["caches"]
    lines += ["", "| cache | sequences | tokens | bytes | bytes/token | bytes/supervised token |",
              "|---|---|---|---|---|---|"]
    for name in c:
        x = c[name]
        lines.append(f"| cache-{name} | {x['sequences']:,} | {x['tokens']:,} | {x['bytes']:,} | "
                     f"{x['bytes_per_token']:.1f} | {x['bytes_per_supervised_token']:.1f} |")
    mi = report["machine"]
    lines += ["", f"Machine: {mi['cpu_model'] or 'unknown CPU'}, {mi['usable_cores']} usable cores, torch "
              f"{mi['torch']} ({mi['torch_threads']} threads); load average at the end "
              f"{', '.join(f'{x:.1f}' for x in mi['loadavg'] or [])}."]
    if report["assets"].get("note"):
        lines += ["", f"Note: {report['assets']['note']}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- run


def run_demo(cfg: DemoConfig, log: Log | None = None) -> dict[str, Any]:
    """Run every stage into ``cfg.out`` and write ``report.md``, ``report.json`` and ``curves.png``. One demo
    at a time per folder: a second is refused in one line naming the first (the lock dies with it)."""
    run_lock = lock_run_folder(cfg.out, "demo")
    try:
        return _run_demo(cfg, log)
    finally:
        run_lock.release()


def _run_demo(cfg: DemoConfig, log: Log | None = None) -> dict[str, Any]:
    """Run every stage into ``cfg.out`` and write ``report.md``, ``report.json`` and ``curves.png``."""
    import torch

    from student.modeling import CausalFNetForCausalLM, count_parameters

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    t_start = time.perf_counter()
    wall: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        log(f"== {stage}")
        t0 = time.perf_counter()
        result = fn()
        wall[stage] = time.perf_counter() - t0
        return result

    assets = timed("assets", lambda: (gsm8k_assets if cfg.gsm8k else embedded_assets)(cfg, log))
    s = cfg.resolved_student()
    seeds = cfg.student_seeds()
    temps = tuple(sorted({1.0, float(s.temperature)}))
    caches = {split: timed(f"teacher-cache {split}",
                           lambda sp=split: teacher_cache_stage(cfg, assets, sp, temps, log))
              for split in ("train", "test")}
    methods = cfg.methods()
    if WRITTEN in methods:
        if cfg.num_threads is not None:  # nothing else runs now: the writer may use every usable core
            torch.set_num_threads(max(cfg.num_threads, cfg.resolved_jobs()))
        caches["written"] = timed("teacher-cache written (the teacher writes, then scores)",
                                  lambda: written_stage(cfg, assets, temps, log))
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
    for old in [*cfg.out.glob("student-*"), *cfg.out.glob("eval-*.jsonl")]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()     # runs of an earlier, other seed set
    jobs = [(m, sd) for sd in seeds for m in methods]
    n_jobs = min(cfg.resolved_jobs(), len(jobs))
    jobs_wall: dict[str, float] = {}

    def teacher_measurements() -> tuple[dict[str, Any], dict[str, Any] | None]:
        t0 = time.perf_counter()
        val = teacher_label_ce(assets, "test", cfg.max_length(), cfg.resolved_val_problems())
        t1 = time.perf_counter()
        quiet = replace(cfg, progress=False) if n_jobs > 1 else cfg
        ex = eval_stage(quiet, assets, "teacher", assets.teacher_dir)
        jobs_wall.update({"teacher val CE": t1 - t0, "eval teacher": time.perf_counter() - t1})
        log(f"teacher: val CE {val['ce']:.4f}" + ("" if ex is None else
                                                   f", exact answer {ex['strict_correct']}/{ex['n']}"))
        return val, ex

    trained, (teacher_val, teacher_exact) = timed(
        f"students: train + eval ({len(jobs)} runs, {n_jobs} at a time; teacher val CE and eval alongside)",
        lambda: train_students(cfg, assets, jobs, log, alongside=teacher_measurements))
    exact = {"teacher": teacher_exact}
    for name, r in trained.items():
        exact[name] = r["exact"]
        jobs_wall[f"train {name}"] = r["final"].get("wall_s", float("nan"))
        jobs_wall[f"eval {name}"] = r["eval_wall_s"]

    teacher = {"val_ce": teacher_val["ce"], "val_label_acc": teacher_val["top1"],
               "val_tokens": teacher_val["tokens"], "val_ppl": teacher_val["ppl"], "exact": exact["teacher"],
               "strict_acc": None if exact["teacher"] is None else exact["teacher"]["strict_acc"]}
    runs: dict[str, dict[str, Any]] = {}
    for sd in seeds:
        ce_final = trained[run_name("ce", sd)]["final"].get("val_ce")
        for m in methods:
            name = run_name(m, sd)
            f, e = trained[name]["final"], exact[name]
            runs[name] = {"method": m, "seed": sd, "out": trained[name]["out"],
                          "alpha": trained[name]["alpha"],
                          "val_ce": f.get("val_ce"), "val_kl": f.get("val_kl"),
                          "val_top1_agree": f.get("val_top1_agree"), "val_label_acc": f.get("val_label_acc"),
                          "val_tokens": f.get("val_tokens"), "train_wall_s": f.get("wall_s"), "exact": e,
                          "strict_acc": None if e is None else e["strict_acc"],
                          "flexible_acc": None if e is None else e["flexible_acc"],
                          "kd_reaches_ce_final_step": (kd_reaches_step(Path(trained[name]["out"]), ce_final)
                                                       if m == "kd" and ce_final is not None else None),
                          "curve_exact": trained[name]["curve_exact"], "final": f}
    n_curve = cfg.resolved_curve_problems()
    curves = {m: [curve_points(runs[run_name(m, sd)],
                               cfg.out / f"eval-{run_name(m, sd)}.jsonl" if exact[run_name(m, sd)] else None,
                               n_curve) for sd in seeds] for m in methods}
    t_curve = dict(teacher)
    if exact["teacher"] is not None and n_curve:
        rec = _eval_records(cfg.out / "eval-teacher.jsonl")[:n_curve]
        t_curve["strict_acc"] = sum(r["strict_correct"] for r in rec) / len(rec)
    summary = build_summary(teacher, runs, seeds)
    n_eval = cfg.resolved_eval_limit()
    if WRITTEN in methods and n_eval:
        correct = {name: [bool(r["strict_correct"]) for r in _eval_records(cfg.out / f"eval-{name}.jsonl")]
                   for name in runs}
        summary["written_verdict"] = written_verdict(summary, correct, seeds, problem_checkpoints(n_eval))
    student = CausalFNetForCausalLM.from_pretrained(Path(runs[run_name("kd", seeds[0])]["out"]) / "final")
    n_student = count_parameters(student)
    plot_curves(curves, t_curve, cfg.out / "curves.png",
                f"KD (topk_tail, alpha {s.alpha:g}, T {s.temperature:g}) vs CE only: {n_student:,}-parameter "
                f"FNet students from a {assets.info['teacher_parameters']:,}-parameter Qwen2 teacher, "
                f"seeds {', '.join(map(str, seeds))} (thin: per seed; band: min-max)")
    wall["total"] = time.perf_counter() - t_start
    n_train = caches["train"]["sequences"]
    report = {
        "variant": "gsm8k smoke test" if cfg.gsm8k else ("tiny" if cfg.tiny else "embedded default"),
        "config": cfg.to_json(), "assets": assets.info, "machine": machine_info(),
        "student_parameters": n_student,
        "data": {"train": n_train, "test": caches["test"]["sequences"],
                 "epochs": (s.steps * s.batch_tokens) / max(1, caches["train"]["tokens"])},
        "teacher": teacher, "runs": runs, "summary": summary, "curves": curves,
        "caches": {split: {k: caches[split][k] for k in ("sequences", "tokens", "supervised_tokens", "bytes",
                                                         "bytes_per_token", "bytes_per_supervised_token",
                                                         "units_skipped", "units_total", "written",
                                                         "kept_correct", "wall_seconds")
                           if k in caches[split]}
                   for split in caches},
        "methods": list(methods),
        "train": {name: {k: v for k, v in r.items() if k != "exact"} for name, r in trained.items()},
        "wall_s": wall, "jobs_wall_s": jobs_wall,
        "files": {"report_md": "report.md", "report_json": "report.json", "curves": "curves.png",
                  "assets": "assets", "caches": [f"cache-{c}" for c in caches],
                  "students": [f"student-{n}" for n in runs],
                  "eval": [f"eval-{n}.jsonl" for n, e in exact.items() if e is not None]},
    }
    report["markdown"] = render_report(report)
    atomic_write_json(cfg.out / "report.json", report)
    atomic_write_bytes(cfg.out / "report.md", report["markdown"].encode())
    return report
