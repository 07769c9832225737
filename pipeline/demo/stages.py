"""The demo's stages: its assets, the teacher caches, and the students (trained side by side in a process
pool, each then answering the held-out problems), with the teacher's own measurements. Each stage writes into
its folder under ``DemoConfig.out`` and returns what the report needs; ``pipeline.demo.run`` calls them in
turn."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from cache.schema import FingerprintMismatch
from cache.util import (
    UserError,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    file_hash,
    json_hash,
)
from pipeline.data import load_tokenizer
from pipeline.demo.assets import build_demo_assets
from pipeline.demo.config import DemoConfig
from pipeline.demo.problems import written_questions
from pipeline.demo.stats import WRITTEN, run_name
from pipeline.demo.teacher import encode_chat_rows, evaluate_teacher
from pipeline.evaluate import evaluate_model
from pipeline.rows import load_examples
from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache
from student.checkpoint import CHECKPOINT
from student.step import TrainHooks
from student.train import train_student

Log = Callable[[str], None]

GSM8K_MARKER = "gsm8k_assets.json"
GSM8K_RECIPE_VERSION = 1


@dataclass(frozen=True)
class Assets:
    data_dir: Path  # holds train.jsonl and test.jsonl
    tokenizer_dir: Path
    teacher_dir: Path
    info: dict


# ------------------------------------------------------------------------------------------------ assets


def embedded_assets(cfg: DemoConfig, log: Log) -> Assets:
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


# ----------------------------------------------------------------------------------------- teacher caches


def cache_or_rebuild(tc: Any, log: Log) -> dict[str, Any]:
    """``run_teacher_cache(tc)``; a folder made with other settings (an earlier demo's) is rebuilt."""
    try:
        return run_teacher_cache(tc)
    except FingerprintMismatch:
        log(f"{tc.out} was made with other settings; rebuilding it")
        shutil.rmtree(tc.out)
        return run_teacher_cache(tc)


def teacher_cache_stage(cfg: DemoConfig, assets: Assets, split: str, temperatures: tuple[float, ...],
                        log: Log) -> dict[str, Any]:
    """Stage one on one split into ``out/cache-<split>``; a cache of another fingerprint is rebuilt."""
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


# ----------------------------------------------------------------------------------------------- students


def student_and_eval(cfg: DemoConfig, assets: Assets, method: str, seed: int, log: Log) -> dict[str, Any]:
    """Train one student, then measure its exact-answer accuracy (``eval_stage``) in the same process."""
    trained = student_stage(cfg, assets, method, seed, log)
    t0 = time.perf_counter()
    exact = eval_stage(cfg, assets, run_name(method, seed), Path(trained["out"]) / "final")
    return {**trained, "exact": exact, "eval_wall_s": time.perf_counter() - t0}


def _worker_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _in_worker(cfg: DemoConfig) -> None:
    """A spawned worker's settings: its own torch thread count, no library progress bars (it does not inherit
    the command's), log lines to stderr."""
    hf_logging.disable_progress_bar()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)


def _student_job(cfg: DemoConfig, assets: Assets, method: str, seed: int) -> dict[str, Any]:
    """One student run and its eval in a worker process (``pid``: which one)."""
    _in_worker(cfg)
    return {**student_and_eval(cfg, assets, method, seed, _worker_log), "pid": os.getpid()}


def _written_job(cfg: DemoConfig, assets: Assets, temperatures: tuple[float, ...]) -> dict[str, Any]:
    """The teacher's writing and scoring (``written_stage``) in a worker process, beside the students that
    train on the reference answers, on one thread: the solutions do not depend on the thread count
    (tests/test_write.py), and the demo's written cache came out byte-identical to a two-thread one."""
    _in_worker(cfg)
    t0 = time.perf_counter()
    summary = written_stage(cfg, assets, temperatures, _worker_log)
    return {"summary": summary, "wall_s": time.perf_counter() - t0, "pid": os.getpid()}


WRITER = "writer"  # the job name of the teacher's writing in ``train_students``
# Every job in a new worker process (Python >= 3.11; 3.10 reuses the workers). A student trained in a process
# that had trained on the written cache before ran 10-15% slower (11.5-11.9 against 10.1-10.6 ms per step,
# measured in one process; returning memory with malloc_trim made no difference), and the demo's third job in
# one worker after the writer and two written-data runs took 153 s instead of 100.
FRESH_PROCESS: dict[str, Any] = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
# What every job imports. Where the platform has a fork server, it imports these once and each job is forked
# from it: still a new process that has trained nothing, but ready in 0.01 s instead of the 4-5 s a spawned
# interpreter takes to import them (2-core Xeon VM, 2026-12-03; a demo student stepped no slower there: 13.5
# against 14.2 ms per step, side by side). Linux only (elsewhere jobs are spawned: macOS frameworks may not
# survive a fork). The server is started once per process and its jobs see the environment it started with.
JOB_PRELOAD = ["torch", "transformers", "pipeline.demo.stages"]


def job_context() -> multiprocessing.context.BaseContext:
    """The start method of the demo's job processes: a fork server that preloaded ``JOB_PRELOAD``, or
    spawn where there is none."""
    if sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(JOB_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def start_job_server(ctx: multiprocessing.context.BaseContext) -> None:
    """Wait until ``ctx``'s fork server (if any) has imported ``JOB_PRELOAD``: one empty process started
    and joined. Without it, the first job's start would block for those seconds and the next job would
    start late."""
    if ctx.get_start_method() == "forkserver":
        p = ctx.Process(target=os.getpid)
        p.start()
        p.join()


def job_pool(workers: int) -> ProcessPoolExecutor:
    """The pool the demo's jobs (and the cache-size study's) run in: ``workers`` processes at a time, each job
    in a new one (``FRESH_PROCESS``) started by ``job_context()``, whose fork server is ready on return."""
    ctx = job_context()
    start_job_server(ctx)
    return ProcessPoolExecutor(workers, mp_context=ctx, **FRESH_PROCESS)


def run_order(jobs: list[tuple[str, int]], writer: bool) -> list[str]:
    """The order in which ``train_students`` starts its jobs when every slot frees in turn: the writer first
    (three runs wait for it), then the runs on reference answers until it is done, then the written-data runs
    (the longest: they decode the larger cache), then the rest. ``_next_job`` applies the same rule to the
    jobs that are ready."""
    names = [run_name(m, sd) for m, sd in jobs]
    if not writer:
        return names
    written = [run_name(m, sd) for m, sd in jobs if m == WRITTEN]
    return [WRITER, *[n for n in names if n not in written], *written]


def _next_job(pending: list[str], done: set[str], written: set[str]) -> str | None:
    """The job to start now: the writer, else a written-data run once the writer is done, else the first
    run on reference answers; None while only written-data runs remain and the writer is still working."""
    if WRITER in pending:
        return WRITER
    if WRITER in done or WRITER not in written:
        for name in pending:
            if name in written:
                return name
    for name in pending:
        if name not in written:
            return name
    return None


def train_students(cfg: DemoConfig, assets: Assets, jobs: list[tuple[str, int]], log: Log,
                   alongside: Callable[[], Any] | None = None,
                   temperatures: tuple[float, ...] | None = None
                   ) -> tuple[dict[str, dict[str, Any]], Any, dict[str, Any] | None, dict[str, list[float]]]:
    """Train and evaluate every (method, seed) run, ``cfg.resolved_jobs()`` processes at a time (1: in this
    process, one after the other). ``alongside`` (the teacher's measurements) runs in this process while
    the workers train, so no core waits for it. With ``temperatures`` (two or more processes only) the
    teacher's writing (``written_stage``) is one more job, the first: the runs on reference answers train
    beside it and the written-data runs start when it is done. Returns (runs by name, what ``alongside``
    returned, the writer's ``{"summary", "wall_s"}`` or None, each job's [start, end] in seconds from the
    call, as the scheduler saw them; empty with one process).

    The runs are independent (each its own seed, folder and data order), so running them side by side only
    changes wall time; progress bars are off in the workers so that their log lines stay readable."""
    n = min(cfg.resolved_jobs(), len(jobs))
    if n <= 1:
        if temperatures is not None:  # one process: the caller writes first, alone, on every usable core
            raise ValueError("train_students writes beside the students only with two or more processes")
        done = {run_name(m, sd): student_and_eval(cfg, assets, m, sd, log) for m, sd in jobs}
        return done, (alongside() if alongside is not None else None), None, {}
    quiet = replace(cfg, progress=False)
    by_name = {run_name(m, sd): (m, sd) for m, sd in jobs}
    written = {name for name, (m, _) in by_name.items() if m == WRITTEN}
    if temperatures is not None:
        written.add(WRITER)
    log(f"training {len(jobs)} students, {n} at a time (one process each)"
        + ("; the teacher writes in one of them first, beside the runs on reference answers"
           if temperatures is not None else "") + "; each student answers the test problems when it is done")
    pending = run_order(jobs, temperatures is not None)
    results: dict[str, Any] = {}
    pool = job_pool(n)
    t0 = time.perf_counter()
    timeline: dict[str, list[float]] = {}
    with pool:
        running: dict[Future, str] = {}

        def fill() -> None:
            while len(running) < n and (name := _next_job(pending, set(results), written)) is not None:
                pending.remove(name)
                timeline[name] = [time.perf_counter() - t0]
                if name == WRITER:
                    running[pool.submit(_written_job, quiet, assets, temperatures)] = name
                else:
                    running[pool.submit(_student_job, quiet, assets, *by_name[name])] = name

        fill()
        extra = alongside() if alongside is not None else None
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                name = running.pop(f)
                timeline[name].append(time.perf_counter() - t0)
                # a failed job raises here: no new job starts, the pool waits for the running ones
                results[name] = f.result()
            fill()
    wrote = results.pop(WRITER, None)
    return {name: results[name] for name in by_name}, extra, wrote, timeline


def student_stage(cfg: DemoConfig, assets: Assets, method: str, seed: int, log: Log) -> dict[str, Any]:
    """Train one student into ``out/student-<method>-s<seed>`` from scratch (an old folder is replaced).

    At every intermediate evaluation the checkpoint answers the first ``curve_problems`` test problems;
    ``exact.jsonl`` in the folder holds one line per point."""
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
    tokenizer = load_tokenizer(str(assets.teacher_dir))
    rows = [{"question": ex.question, "answer": ex.answer}
            for ex in load_examples(str(assets.data_dir), split, limit=limit)]
    model = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    return evaluate_teacher(model, encode_chat_rows(tokenizer, rows, max_length), tokenizer.pad_token_id,
                            batch_size=16)


def eval_stage(cfg: DemoConfig, assets: Assets, name: str, model_dir: Path) -> dict[str, Any] | None:
    n = cfg.resolved_eval_limit()
    if n == 0:
        return None
    r = evaluate_model(model_dir, str(assets.data_dir), "test", n,
                       max_new_tokens=cfg.resolved_max_new_tokens(), batch_size=50, device="cpu",
                       dtype="float32", out=cfg.out / f"eval-{name}.jsonl", progress=cfg.progress)
    return r.to_json()
