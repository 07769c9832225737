"""Build the demo's data, tokenizer and teacher into one folder, reused between runs by a content key."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cache.util import UserError, atomic_replace_dir, atomic_write_json, fsync_tree, json_hash
from pipeline.demo.problems import GENERATOR_VERSION, generate_splits, write_jsonl
from pipeline.demo.teacher import TeacherConfig, train_teacher
from pipeline.demo.tokenizer import train_tokenizer

# Bump when the tokenizer or teacher recipe changes in a way the settings below do not capture.
RECIPE_VERSION = 1
MARKER = "demo_assets.json"

BASE_TRAIN = 3000
BASE_TEST = 300
BASE_TEACHER_STEPS = 300
VOCAB_SIZE = 1024


@dataclass(frozen=True)
class DemoAssets:
    train_jsonl: Path
    test_jsonl: Path
    tokenizer_dir: Path
    teacher_dir: Path
    stats: dict


def demo_settings(scale: float = 1.0, seed: int = 0, n_train: int | None = None,
                  n_test: int | None = None, teacher_steps: int | None = None) -> dict:
    """The resolved settings of a build; their hash is the cache key.

    ``scale`` multiplies the default data sizes and teacher steps; explicit values win over it.
    """
    if not scale > 0:
        raise UserError(f"demo scale={scale} must be positive (1 is the default, 0.05 a quick smoke run)")
    scale = float(scale)
    n_train = n_train if n_train is not None else max(32, round(BASE_TRAIN * scale))
    n_test = n_test if n_test is not None else max(16, round(BASE_TEST * scale))
    steps = teacher_steps if teacher_steps is not None else max(10, round(BASE_TEACHER_STEPS * scale))
    teacher = TeacherConfig(steps=steps, warmup_steps=min(20, max(1, steps // 10)), seed=seed)
    if n_train < 1 or n_test < 1:
        raise UserError(f"n_train={n_train}, n_test={n_test}: both must be at least 1")
    return {
        "generator_version": GENERATOR_VERSION, "recipe_version": RECIPE_VERSION, "seed": seed,
        "scale": scale, "n_train": n_train, "n_test": n_test, "vocab_size": VOCAB_SIZE,
        "teacher": asdict(teacher),
    }


def _paths(root: Path) -> dict[str, Path]:
    return {"train_jsonl": root / "data" / "train.jsonl", "test_jsonl": root / "data" / "test.jsonl",
            "tokenizer_dir": root / "tokenizer", "teacher_dir": root / "teacher"}


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _remove_stale_builds(out: Path) -> None:
    """Remove temporary build folders beside ``out`` left by builds whose process no longer exists."""
    for leftover in out.parent.glob(f".{out.name}.build-*-*"):
        pid = leftover.name[len(f".{out.name}.build-"):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass


def _build(root: Path, settings: dict, log: Callable[[str], None]) -> dict:
    paths = _paths(root)
    t0 = time.perf_counter()
    train_rows, test_rows = generate_splits(settings["n_train"], settings["n_test"], settings["seed"])
    write_jsonl(paths["train_jsonl"], train_rows)
    write_jsonl(paths["test_jsonl"], test_rows)
    t1 = time.perf_counter()
    log(f"demo data: {len(train_rows)} train / {len(test_rows)} test problems")
    tokenizer = train_tokenizer((r["question"] + "\n" + r["answer"] for r in train_rows),
                                paths["tokenizer_dir"], vocab_size=settings["vocab_size"],
                                model_max_length=settings["teacher"]["max_length"])
    tokenizer.save_pretrained(paths["teacher_dir"])
    t2 = time.perf_counter()
    log(f"demo tokenizer: {len(tokenizer)} tokens")
    teacher = train_teacher(tokenizer, train_rows, test_rows, paths["teacher_dir"],
                            TeacherConfig(**settings["teacher"]), log=log)
    t3 = time.perf_counter()
    log(f"demo teacher: val CE {teacher['val']['ce']:.3f} nats/token (ppl {teacher['val']['ppl']:.2f}; "
        f"uniform {teacher['uniform_ce']:.3f})")
    return {
        "tokenizer_vocab": len(tokenizer),
        "teacher": teacher,
        "wall_s": {"data": t1 - t0, "tokenizer": t2 - t1, "teacher": t3 - t2, "total": t3 - t0},
    }


def build_demo_assets(out_dir: str | Path, scale: float = 1.0, seed: int = 0, n_train: int | None = None,
                      n_test: int | None = None, *, teacher_steps: int | None = None,
                      log: Callable[[str], None] | None = None) -> DemoAssets:
    """Generate problems, train the tokenizer and the teacher into ``out_dir``, or reuse what is there.

    ``out_dir`` belongs to the demo assets: when it holds assets of other settings it is rebuilt and
    replaced as a whole (in a temporary folder beside it, then renamed), so nothing half-built is ever
    visible. A non-empty folder that is not demo assets is refused. Layout: ``data/{train,test}.jsonl``
    (GSM8K fields), ``tokenizer/``, ``teacher/`` (model + tokenizer) and ``demo_assets.json``.
    ``stats["reused"]`` says whether the folder was reused.
    """
    log = log or (lambda _msg: None)
    out = Path(out_dir).resolve()
    settings = demo_settings(scale, seed, n_train, n_test, teacher_steps)
    key = json_hash(settings)
    marker = _read_marker(out)
    paths = _paths(out)
    if marker is not None and marker.get("key") == key and all(p.exists() for p in paths.values()):
        log(f"demo assets reused from {out}")
        return DemoAssets(**paths, stats={**marker["stats"], "key": key, "reused": True})
    if out.exists() and marker is None and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and does not hold demo assets; pass an empty or new folder")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-{os.getpid()}-", dir=out.parent))
    try:
        stats = _build(tmp, settings, log)
        atomic_write_json(tmp / MARKER, {"key": key, "settings": settings, "stats": stats})
        fsync_tree(tmp)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoAssets(**paths, stats={**stats, "key": key, "reused": False})
