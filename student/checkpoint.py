"""Saved student folders and resuming from them.

An output folder holds ``checkpoint-last/`` (the model as ``save_pretrained`` + the cache's tokenizer +
``train_config.json`` + ``provenance.json`` + ``trainer_state.pt`` with optimizer, scaler, RNG and data
position) and ``final/`` (the same without the trainer state). ``write_model_folder`` is the one place that
decides what a saved student folder contains.

Integrity: each folder is written beside its final name as ``.NAME.tmp-PID``; its ``manifest.json`` (every
file's size and xxh3-128 content hash, and the step) is written last, then the folder is synced and renamed
into place (``write_folder_atomically``). Replacing a folder takes two renames (old aside to
``.NAME.old-PID``, new into place); a crash between them leaves no ``NAME/`` but two complete hidden folders,
and ``recover_folders`` (run at every start) renames the newest complete one back into place and removes
every hidden leftover. ``verify_folder`` checks a folder against its manifest (one line naming the damaged
file); the checks of a checkpoint to resume are ``student.sources.resume_config`` and ``check_resume``.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cache.util import (
    UserError,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    copy_tree_plain,
    file_hash,
    fsync_dir,
    fsync_tree,
    tree_files,
)
from cache.version import __version__
from student.metrics import METRICS
from student.model_card import write_model_card
from student.train_config import TrainConfig, recorded_config
from student.train_data import TrainData

CHECKPOINT = "checkpoint-last"
FINAL = "final"
BEST = "best"
TRAIN_CONFIG = "train_config.json"
PROVENANCE = "provenance.json"
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
FOLDER_FORMAT = "fnet-distill-student-folder"
FOLDER_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states (tensors and lists: ``weights_only`` loads)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    name, keys, *rest = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ------------------------------------------------------------------------------------------ writing folders


def provenance(cfg: TrainConfig, data: TrainData, state: dict[str, Any], *, world_size: int, precision: str,
               micro_batches_per_step: int) -> dict[str, Any]:
    """Where a saved model came from: the caches (by fingerprint digest), the code, the step reached."""
    return {
        "cache": str(cfg.cache), "cache_fingerprint_digest": data.fingerprint_digest,
        "mix": data.mix,
        "val_cache": None if cfg.val_cache is None else str(cfg.val_cache),
        "val_cache_fingerprint_digest": (data.val_reader.fingerprint_digest
                                         if data.val_reader is not None else None),
        "code_version": __version__, "torch": torch.__version__, "step": state["step"],
        "tokens": state["tokens"], "supervised_tokens": state["supervised_tokens"],
        "world_size": world_size, "precision": precision,
        "micro_batches_per_step": micro_batches_per_step,
    }


def write_model_folder(folder: Path, model: nn.Module, tokenizer_dir: Path | None, cfg: TrainConfig,
                       prov: dict[str, Any]) -> None:
    """Everything a saved student folder holds besides the trainer state: ``save_pretrained`` weights +
    config (and the model code, for ``trust_remote_code``), the cache's tokenizer, the resolved train config,
    the provenance and the model card ``README.md``."""
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        copy_tree_plain(tokenizer_dir, folder)  # the output's modes, not a read-only cache's
    model.save_pretrained(folder)
    atomic_write_json(folder / TRAIN_CONFIG, {"config": recorded_config(cfg),
                                              "student": model.config.to_diff_dict()})
    atomic_write_json(folder / PROVENANCE, prov)
    write_model_card(folder, cache_dir=cfg.cache, metrics_file=cfg.out / METRICS)


def write_trainer_state(folder: Path, trainer: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(trainer, buf)
    atomic_write_bytes(folder / TRAINER_STATE, buf.getvalue())


def write_folder_manifest(folder: Path, step: int) -> dict[str, Any]:
    """``manifest.json``: size and content hash of every other file under ``folder``, and the step."""
    files = {f["path"]: {"bytes": f["bytes"], "hash": f["hash"]}
             for f in tree_files(folder, folder, skip=(MANIFEST,))}
    manifest = {"format": FOLDER_FORMAT, "format_version": FOLDER_FORMAT_VERSION, "step": int(step),
                "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def folder_problem(folder: Path) -> str | None:
    """What is wrong with a saved folder against its manifest (the first damaged file), or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FOLDER_FORMAT or not isinstance(files, dict):
            return f"{MANIFEST} is not a student-folder manifest"
    except FileNotFoundError:
        return f"has no {MANIFEST} (an interrupted write, or a folder not written by train-student)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{rel} has {size} bytes but the manifest records {want['bytes']} (truncated or replaced)"
        if file_hash(path) != want["hash"]:
            return f"{rel} does not match its content hash in {MANIFEST} (damaged or replaced)"
    return None


def verify_folder(folder: Path, what: str) -> dict[str, Any]:
    """The folder's manifest after checking every file against it; one-line UserError naming the file."""
    problem = folder_problem(folder)
    if problem is not None:
        raise UserError(f"{what}: {folder}: {problem}; restore the folder from a copy or start a new --out")
    return json.loads((folder / MANIFEST).read_text())


def check_folder_manifest(folder: Path, what: str) -> None:
    """Before a saved student folder is read outside training (``generate``, ``eval``, the demo's
    evaluations): every file against the folder's ``manifest.json``, when it has one; a one-line UserError
    naming the damaged file otherwise (the commands' ``--no-verify`` skips this call, for a folder edited on
    purpose). A folder without a manifest (saved by hand with ``save_pretrained``) is read unchecked, and so
    is any folder loaded through plain ``from_pretrained``."""
    if not (folder / MANIFEST).is_file():
        return
    problem = folder_problem(folder)
    if problem is not None:
        raise UserError(f"{what} {folder}: {problem}; restore the folder from a copy, or pass --no-verify to "
                        "read it as it is")


def write_folder_atomically(out: Path, name: str, write: Callable[[Path], None], step: int) -> Path:
    """``write(tmp)`` fills a hidden folder beside ``out / name``; its manifest is written last, then the
    folder is synced and renamed into place (the previous folder of that name is replaced). On an error the
    hidden folder is removed."""
    dst = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        write_folder_manifest(tmp, step)
        fsync_tree(tmp)
        atomic_replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _hidden_leftovers(out: Path, name: str) -> list[Path]:
    return sorted(p for pattern in (f".{name}.tmp-*", f".{name}.old-*") for p in out.glob(pattern)
                  if p.is_dir())


def recover_folders(out: Path, names: tuple[str, ...] = (CHECKPOINT, FINAL, BEST)) -> list[str]:
    """After a crash: where ``out / NAME`` is missing, rename the complete hidden copy with the highest step
    (``.NAME.tmp-*`` / ``.NAME.old-*``, complete per its manifest) into place; then remove every hidden
    leftover. Returns one note per recovered folder."""
    notes = []
    if not out.is_dir():
        return notes
    for name in names:
        leftovers = _hidden_leftovers(out, name)
        dst = out / name
        if not dst.exists():
            # the newest step wins; at equal steps the new copy (.tmp-) over the one moved aside (.old-)
            complete = [(json.loads((p / MANIFEST).read_text())["step"], ".tmp-" in p.name, p)
                        for p in leftovers if folder_problem(p) is None]
            if complete:
                step, _, best = max(complete, key=lambda c: (c[0], c[1]))
                os.replace(best, dst)
                fsync_dir(out)
                notes.append(f"recovered {dst} (step {step}) from {best.name}, left by an interrupted write")
        for p in _hidden_leftovers(out, name):
            shutil.rmtree(p, ignore_errors=True)
    return notes
