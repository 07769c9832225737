"""``fnet-distill demo``: the whole pipeline end to end, then a KD-vs-CE report.

Stages, each with its own folder under ``out``:

1. ``assets/``: data, tokenizer and teacher. The embedded default (``pipeline.demo.build_demo_assets``), or
   with ``gsm8k=True`` a GSM8K slice + the real Qwen2 tokenizer from ``shared`` + a small random-init Qwen2
   teacher (a smoke test of the real path). Reused while their settings are unchanged.
2. ``cache-train/``, ``cache-test/``: ``run_teacher_cache`` on both splits (fingerprinted; a finished cache of
   the same fingerprint is reused, one of another fingerprint is rebuilt).
3. ``student-kd/``, ``student-ce/``: ``train_student`` twice with the same student, steps, data order, seed
   and learning rate; only ``alpha`` differs (CE-only is ``alpha = 1``). Always retrained.
4. ``eval-{teacher,kd,ce}.jsonl``: greedy exact-answer accuracy on the test split (``evaluate_model``).
5. ``report.md``, ``report.json``, ``curves.png``.

Validation metrics are the training loop's final evaluation on ``cache-test`` (label CE, KL(teacher ||
student) at T = 1 over top-k + tail, top-1 agreement with the teacher). The teacher's row is its own label CE
on the same supervised tokens (KL 0 and agreement 1 by definition).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cache.util import (
    UserError,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    file_hash,
    json_hash,
)

Log = Callable[[str], None]

GSM8K_MARKER = "gsm8k_assets.json"
GSM8K_RECIPE_VERSION = 1


@dataclass
class StudentBudget:
    """The student and its training budget, shared by the KD and the CE-only run (only ``alpha`` differs)."""

    hidden_size: int = 128
    layers: int = 2
    ffn: int = 512
    window: int = 16
    max_positions: int = 512
    dropout: float = 0.1
    steps: int = 300
    batch_tokens: int = 2048
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 30
    weight_decay: float = 0.1
    kd: str = "topk_tail"
    alpha: float = 0.5
    temperature: float = 1.0
    eval_points: int = 5
    compact_vocab: bool = False


@dataclass
class DemoConfig:
    """One demo run. ``scale`` multiplies data sizes, teacher steps, student steps and evaluated problems."""

    out: Path
    scale: float = 1.0
    seed: int = 0
    gsm8k: bool = False
    tiny: bool = False
    shared: Path | None = None
    steps: int | None = None
    eval_limit: int | None = None
    max_new_tokens: int = 160
    topk: int = 32
    num_threads: int | None = 1
    progress: bool = True
    student: StudentBudget = field(default_factory=StudentBudget)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.shared is not None:
            self.shared = Path(self.shared)
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise UserError(f"--scale {self.scale} must be a positive number (1 is the default budget)")
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {self.steps})")
        if self.eval_limit is not None and self.eval_limit < 0:
            raise UserError(f"--eval-limit must be >= 0 (0 skips the exact-answer evaluation; got "
                            f"{self.eval_limit})")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.topk < 1:
            raise UserError(f"--topk must be at least 1 (got {self.topk})")
        if not 0.0 <= self.student.alpha < 1.0:
            raise UserError(f"--alpha {self.student.alpha} must be in [0, 1): the KD run needs a KD term "
                            "(the CE-only run uses alpha 1)")
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; pass a folder for the demo outputs")

    # Resolved sizes: the defaults below are the tuned demo budget; --tiny and --gsm8k change them.

    def asset_scale(self) -> float:
        return 0.05 * self.scale if self.tiny else self.scale

    def resolved_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        base = 12 if self.tiny else (60 if self.gsm8k else self.student.steps)
        return max(1, round(base * self.scale))

    def resolved_eval_limit(self) -> int:
        if self.eval_limit is not None:
            return self.eval_limit
        return max(1, round((4 if self.tiny else 8 if self.gsm8k else 300) * self.scale))

    def resolved_student(self) -> StudentBudget:
        s = self.student
        if self.tiny:
            s = replace(s, hidden_size=32, layers=1, ffn=64, window=8, batch_tokens=2048, warmup=2,
                        eval_points=2)
        if self.gsm8k:
            s = replace(s, hidden_size=64, layers=2, ffn=256, window=16, batch_tokens=4096, warmup=5,
                        eval_points=2, compact_vocab=True, max_positions=640)
        return replace(s, steps=self.resolved_steps())

    def max_length(self) -> int:
        return 640 if self.gsm8k else 512

    def resolved_max_new_tokens(self) -> int:
        return min(self.max_new_tokens, 48) if (self.tiny or self.gsm8k) else self.max_new_tokens

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"], d["shared"] = str(self.out), None if self.shared is None else str(self.shared)
        d["resolved"] = {"asset_scale": self.asset_scale(), "student": asdict(self.resolved_student()),
                         "eval_limit": self.resolved_eval_limit(),
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

    a = build_demo_assets(cfg.out / "assets", scale=cfg.asset_scale(), seed=cfg.seed, log=log)
    t = a.stats["teacher"]
    info = {"kind": "embedded", "reused": a.stats["reused"], "key": a.stats["key"],
            "tokenizer_vocab": a.stats["tokenizer_vocab"], "teacher_parameters": t["parameters"],
            "teacher_val_ce_at_build": t["val"]["ce"], "uniform_ce": t["uniform_ce"],
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


def teacher_cache_stage(cfg: DemoConfig, assets: Assets, split: str, temperatures: tuple[float, ...],
                        log: Log) -> dict[str, Any]:
    """Stage one on one split into ``out/cache-<split>``; a cache of another fingerprint is rebuilt."""
    from cache.format import FingerprintMismatch
    from pipeline.teacher_cache import TeacherCacheConfig, run_teacher_cache

    out = cfg.out / f"cache-{split}"
    tc = TeacherCacheConfig(teacher=str(assets.teacher_dir), dataset=str(assets.data_dir), split=split,
                            out=out, topk=cfg.topk, temperatures=temperatures, max_length=cfg.max_length(),
                            batch_tokens=8192, device="cpu", unit_size=512, seed=cfg.seed,
                            progress=cfg.progress)
    try:
        summary = run_teacher_cache(tc)
    except FingerprintMismatch:
        log(f"{out} was made with other settings; rebuilding it")
        shutil.rmtree(out)
        summary = run_teacher_cache(tc)
    log(f"cache-{split}: {summary['sequences']} sequences, {summary['tokens']:,} tokens, "
        f"{summary['bytes_per_token']:.1f} bytes/token ({summary['units_skipped']} of "
        f"{summary['units_total']} units reused)")
    return summary


def student_stage(cfg: DemoConfig, name: str, alpha: float, log: Log) -> dict[str, Any]:
    """Train one student into ``out/student-<name>`` from scratch (an old folder there is replaced)."""
    from student.train import TrainConfig, train_student

    s = cfg.resolved_student()
    out = cfg.out / f"student-{name}"
    shutil.rmtree(out, ignore_errors=True)
    eval_every = max(1, s.steps // max(1, s.eval_points))
    tc = TrainConfig(cache=cfg.out / "cache-train", val_cache=cfg.out / "cache-test", out=out,
                     hidden_size=s.hidden_size, layers=s.layers, ffn=s.ffn, window=s.window,
                     max_positions=s.max_positions, dropout=s.dropout, steps=s.steps,
                     batch_tokens=s.batch_tokens, lr=s.lr, min_lr=s.min_lr,
                     warmup=min(s.warmup, s.steps // 2),
                     weight_decay=s.weight_decay, alpha=alpha, temperature=s.temperature, kd=s.kd,
                     compact_vocab=s.compact_vocab, eval_every=eval_every, save_every=0,
                     log_every=max(1, min(10, s.steps // 20)), seed=cfg.seed, device="cpu", num_workers=0,
                     progress=cfg.progress)
    result = train_student(tc)
    m = result.final_metrics
    log(f"student-{name}: {m['step']} steps in {result.wall_s:.1f}s, val CE "
        f"{m.get('val_ce', float('nan')):.4f}, val KL {m.get('val_kl', float('nan')):.4f}")
    return {"out": str(out), "alpha": alpha, "train_config": tc.to_json(), "final": m}


def teacher_label_ce(assets: Assets, split: str, max_length: int) -> dict[str, Any]:
    """The teacher's own CE (nats per supervised token), perplexity and top-1 accuracy on a split's labels,
    on the same chat-formatted, assistant-only supervised tokens as the cache."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data import load_examples, load_tokenizer
    from pipeline.demo.teacher import encode_chat_rows, evaluate_teacher

    tokenizer = load_tokenizer(str(assets.teacher_dir))
    rows = [{"question": ex.question, "answer": ex.answer}
            for ex in load_examples(str(assets.data_dir), split)]
    model = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    return evaluate_teacher(model, encode_chat_rows(tokenizer, rows, max_length), tokenizer.pad_token_id,
                            batch_size=16)


def eval_stage(cfg: DemoConfig, assets: Assets, name: str, model_dir: Path) -> dict[str, Any] | None:
    from pipeline.evaluate import evaluate_model

    n = cfg.resolved_eval_limit()
    if n == 0:
        return None
    r = evaluate_model(model_dir, str(assets.data_dir), "test", n,
                       max_new_tokens=cfg.resolved_max_new_tokens(), batch_size=32, device="cpu",
                       dtype="float32", out=cfg.out / f"eval-{name}.jsonl",
                       progress=cfg.progress)
    return r.to_json()


# ------------------------------------------------------------------------------------------------ report


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _metrics_rows(student_dir: Path) -> list[dict[str, Any]]:
    path = student_dir / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_kd_vs_ce(kd_dir: Path, ce_dir: Path, png: Path, teacher_ce: float | None = None) -> None:
    """Both students on one figure: train/val label CE (left, with the teacher's val CE as a dashed line),
    val KL to the teacher (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, folder, color in (("KD", kd_dir, "tab:blue"), ("CE only", ce_dir, "tab:orange")):
        rows = _metrics_rows(folder)
        train = [(r["step"], r["ce"]) for r in rows if r.get("event") == "train" and r.get("ce") is not None]
        val = [r for r in rows if r.get("event") == "eval"]
        if train:
            ax.plot(*zip(*train), "-", color=color, alpha=0.45, lw=1, label=f"{label}: train CE")
        if val:
            ax.plot([r["step"] for r in val], [r["val_ce"] for r in val], "o-", color=color,
                    label=f"{label}: val CE")
            kl = [(r["step"], r["val_kl"]) for r in val if r.get("val_kl") is not None]
            if kl:
                ax2.plot(*zip(*kl), "s-", color=color, label=f"{label}: val KL(teacher || student)")
    if teacher_ce is not None:
        ax.axhline(teacher_ce, color="gray", ls="--", lw=1, label="teacher: val CE")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("label CE, nats per supervised token")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("KL at T=1, nats per supervised token")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    fig.suptitle("KD vs CE-only student (same student, steps, data order, seed, lr)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _acc(e: dict[str, Any] | None, key: str) -> str:
    if e is None:
        return "not run"
    return f"{e[key]:.1%} ({e[key.replace('_acc', '_correct')]}/{e['n']})"


def render_report(report: dict[str, Any]) -> str:
    """The markdown report: metrics per model, wall time per stage, cache size, and the KD-vs-CE verdict."""
    m, c, s = report["models"], report["caches"], report["config"]["resolved"]["student"]
    lines = [f"# fnet-distill demo report ({report['variant']})", "",
             f"Teacher: {report['assets']['teacher_parameters']:,} parameters; student: "
             f"{report['student_parameters']:,} parameters (d={s['hidden_size']}, {s['layers']} layers, "
             f"FFN {s['ffn']}, W={s['window']}); {s['steps']} steps of <= {s['batch_tokens']} tokens, lr "
             f"{s['lr']:g}; KD = `{s['kd']}`, alpha {s['alpha']:g}, T {s['temperature']:g}; "
             "CE only = alpha 1.",
             "",
             "| model | val CE (nats/token) | KL to teacher (T=1) | top-1 agreement | exact answer (strict) "
             "| exact answer (last number) |",
             "|---|---|---|---|---|---|"]
    for name, row in (("teacher", m["teacher"]), ("KD student", m["kd"]), ("CE-only student", m["ce"])):
        lines.append(f"| {name} | {_fmt(row['val_ce'], '.4f')} | {_fmt(row['val_kl'], '.4f')} | "
                     f"{_fmt(row['val_top1_agree'], '.2%')} | {_acc(row['exact'], 'strict_acc')} | "
                     f"{_acc(row['exact'], 'flexible_acc')} |")
    v = report["kd_vs_ce"]
    lines += ["", f"KD beats CE only on validation CE: **{'yes' if v['val_ce'] else 'no'}** "
              f"({v['val_ce_delta']:+.4f} nats/token), on KL to the teacher: "
              f"**{'yes' if v['val_kl'] else 'no'}** ({v['val_kl_delta']:+.4f}). "
              f"Validation: {m['kd']['val_tokens']:,} supervised tokens of the test split.", "",
              "| stage | wall time (s) |", "|---|---|"]
    for stage, sec in report["wall_s"].items():
        lines.append(f"| {stage} | {sec:.1f} |")
    lines += ["", "| cache | sequences | tokens | bytes | bytes/token | bytes/supervised token |",
              "|---|---|---|---|---|---|"]
    for name in ("train", "test"):
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
    """Run every stage into ``cfg.out`` and write ``report.md``, ``report.json`` and ``curves.png``."""
    import torch

    from student.modeling import CausalFNetForCausalLM, count_parameters

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
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
    temps = tuple(sorted({1.0, float(s.temperature)}))
    caches = {split: timed(f"teacher-cache {split}",
                           lambda sp=split: teacher_cache_stage(cfg, assets, sp, temps, log))
              for split in ("train", "test")}
    kd = timed("train-student KD", lambda: student_stage(cfg, "kd", s.alpha, log))
    ce = timed("train-student CE", lambda: student_stage(cfg, "ce", 1.0, log))
    teacher_val = timed("teacher val CE", lambda: teacher_label_ce(assets, "test", cfg.max_length()))
    exact = {name: timed(f"eval {name}", lambda n=name, d=folder: eval_stage(cfg, assets, n, d))
             for name, folder in (("teacher", assets.teacher_dir), ("kd", cfg.out / "student-kd" / "final"),
                                  ("ce", cfg.out / "student-ce" / "final"))}
    plot_kd_vs_ce(cfg.out / "student-kd", cfg.out / "student-ce", cfg.out / "curves.png", teacher_val["ce"])
    wall["total"] = time.perf_counter() - t_start

    def student_row(r: dict[str, Any], name: str) -> dict[str, Any]:
        f = r["final"]
        return {"val_ce": f.get("val_ce"), "val_kl": f.get("val_kl"),
                "val_top1_agree": f.get("val_top1_agree"), "val_label_acc": f.get("val_label_acc"),
                "val_tokens": f.get("val_tokens"),
                "train_wall_s": f.get("wall_s"), "exact": exact[name], "final": f}

    models = {
        "teacher": {"val_ce": teacher_val["ce"], "val_kl": 0.0, "val_top1_agree": 1.0,
                    "val_label_acc": teacher_val["top1"], "val_tokens": teacher_val["tokens"],
                    "val_ppl": teacher_val["ppl"], "exact": exact["teacher"]},
        "kd": student_row(kd, "kd"), "ce": student_row(ce, "ce"),
    }
    kd_m, ce_m = models["kd"], models["ce"]
    student = CausalFNetForCausalLM.from_pretrained(cfg.out / "student-kd" / "final")
    report = {
        "variant": "gsm8k smoke test" if cfg.gsm8k else ("tiny" if cfg.tiny else "embedded default"),
        "config": cfg.to_json(), "assets": assets.info, "machine": machine_info(),
        "student_parameters": count_parameters(student),
        "models": models,
        "kd_vs_ce": {"val_ce": kd_m["val_ce"] < ce_m["val_ce"], "val_kl": kd_m["val_kl"] < ce_m["val_kl"],
                     "val_ce_delta": kd_m["val_ce"] - ce_m["val_ce"],
                     "val_kl_delta": kd_m["val_kl"] - ce_m["val_kl"]},
        "caches": {split: {k: caches[split][k] for k in ("sequences", "tokens", "supervised_tokens", "bytes",
                                                         "bytes_per_token", "bytes_per_supervised_token",
                                                         "units_skipped", "units_total")}
                   for split in caches},
        "train": {"kd": kd, "ce": ce},
        "wall_s": wall,
        "files": {"report_md": "report.md", "report_json": "report.json", "curves": "curves.png",
                  "assets": "assets", "caches": ["cache-train", "cache-test"],
                  "students": ["student-kd", "student-ce"],
                  "eval": [f"eval-{n}.jsonl" for n, e in exact.items() if e is not None]},
    }
    report["markdown"] = render_report(report)
    atomic_write_json(cfg.out / "report.json", report)
    atomic_write_bytes(cfg.out / "report.md", report["markdown"].encode())
    return report
