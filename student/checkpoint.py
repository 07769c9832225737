"""Saved student folders and resuming from them.

An output folder holds ``checkpoint-last/`` (the model as ``save_pretrained`` + the cache's tokenizer +
``train_config.json`` + ``provenance.json`` + ``trainer_state.pt`` with optimizer, scaler, RNG and data
position) and ``final/`` (the same without the trainer state). Each folder is written beside its final name
and renamed into place (``write_folder_atomically``); ``write_model_folder`` is the one place that decides
what a saved student folder contains. ``check_resume`` accepts a checkpoint only for the same settings and
caches.
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

from cache.util import UserError, atomic_replace_dir, atomic_write_bytes, atomic_write_json, fsync_tree
from cache.version import __version__
from student.train_config import RESUME_FREE, TrainConfig
from student.train_data import TrainData

CHECKPOINT = "checkpoint-last"
FINAL = "final"
TRAIN_CONFIG = "train_config.json"
PROVENANCE = "provenance.json"
TRAINER_STATE = "trainer_state.pt"


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
        "cache": str(cfg.cache), "cache_fingerprint_digest": data.reader.fingerprint_digest,
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
    config, the cache's tokenizer, the resolved train config and the provenance."""
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    model.save_pretrained(folder)
    atomic_write_json(folder / TRAIN_CONFIG, {"config": cfg.to_json(),
                                              "student": model.config.to_diff_dict()})
    atomic_write_json(folder / PROVENANCE, prov)


def write_trainer_state(folder: Path, trainer: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(trainer, buf)
    atomic_write_bytes(folder / TRAINER_STATE, buf.getvalue())


def write_folder_atomically(out: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a hidden folder beside ``out / name``, which is then synced and renamed into place
    (the previous folder of that name is replaced); on any error the hidden folder is removed."""
    dst = out / name
    tmp = out / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        fsync_tree(tmp)
        atomic_replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ------------------------------------------------------------------------------------------------- resume


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
