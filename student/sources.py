"""Where a run starts (``resolve_start``, the one place that chooses): a new student from the shape options
(``build_student``: the FNet, or ``--student qwen2|llama``, or a ``--student-config`` file), a saved folder
(``--init-from``: a student, a cut-student folder or any pretrained transformers causal LM) or the run's
own ``checkpoint-last/`` (``--resume``: ``resume_config``, ``check_resume``), each checked before any
training. Transformer students are ``student.any_student.CausalLMStudent``.

A saved folder must hold a student (``model_type`` ``causal_stft_fnet``) whose weights fill its config
exactly (no missing, unexpected or resized tensor): transformers would otherwise load a Qwen2 folder, say,
as a randomly initialised student with a warning. A ``--student-config`` must describe a student, and with
``--compact-vocab`` its vocabulary must be the cache's: compaction builds the vocabulary from the cache and
would silently replace another one.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from cache.util import UserError
from student import any_student
from student.any_student import CausalLMStudent
from student.checkpoint import CHECKPOINT, MANIFEST, PROVENANCE, TRAIN_CONFIG, TRAINER_STATE, verify_folder
from student.modeling import CausalFNetConfig, CausalFNetForCausalLM
from student.train_config import RESUME_FREE, SHAPE_FIELDS, TrainConfig, recorded_config
from student.train_data import (
    TrainData,
    cache_token_ids,
    check_student_vocabulary,
    open_training_data,
    student_model_config,
    tokenizer_info,
)

STUDENT_MODEL_TYPE = CausalFNetConfig.model_type


class Start(NamedTuple):
    """How a run starts: the config to run with (with ``--extend``, the checkpoint's schedule), the checked
    caches, the student, and the trainer state to restore (``--resume`` only, else None)."""

    cfg: TrainConfig
    data: TrainData
    model: nn.Module
    trainer_state: dict[str, Any] | None


def resolve_start(cfg: TrainConfig) -> Start:
    """The fresh / resume / init-from decision: ``--resume`` continues ``checkpoint-last/`` (its files,
    settings and caches checked); without it the output folder must hold no run, and the student comes from
    ``--init-from`` or is built new (the FNet or a transformers model, ``build_student``)."""
    ckpt = cfg.out / CHECKPOINT
    if cfg.resume:
        if not (ckpt / TRAINER_STATE).is_file():
            raise UserError(f"--resume: there is no checkpoint in {ckpt}; run without --resume to start")
        cfg = resume_config(cfg, ckpt)  # checks the files; with --extend, the checkpoint's schedule
        data = open_training_data(cfg)
        trainer_state = check_resume(cfg, ckpt, data)
        model = load_any_student(ckpt, "--resume")
        check_any_vocabulary(model, data)
        return Start(cfg, data, model, trainer_state)
    if ckpt.exists():
        raise UserError(f"{cfg.out} already holds a training run ({CHECKPOINT}/); pass --resume to "
                        "continue it or choose another --out")
    data = open_training_data(cfg)
    model = init_from_folder(cfg, data) if cfg.init_from is not None else build_student(cfg, data)
    return Start(cfg, data, model, None)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: {path} does not exist; pass a folder written by train-student") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what}: {path} is not valid JSON ({e}); pass a folder written by train-student") \
            from None


def load_student_folder(folder: Path, what: str) -> CausalFNetForCausalLM:
    """The student saved in ``folder`` (fp32), or a one-line UserError when the folder holds another model
    type or weights that do not fill the student's config."""
    config = _read_json(folder / "config.json", what)
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != STUDENT_MODEL_TYPE:
        raise UserError(f"{what} {folder} holds a {kind!r} model, not a student ({STUDENT_MODEL_TYPE!r}); "
                        "pass a final/, best/ or checkpoint-last/ folder written by train-student")
    try:
        model, info = CausalFNetForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                            output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{what}: the student in {folder} does not load ({str(e).splitlines()[0][:300]}); "
                        "pass a folder written by train-student") from None
    any_student.refuse_partial_load(info, what, folder, "a folder written by train-student")
    return model


def load_any_student(folder: Path, what: str) -> nn.Module:
    """The student saved in ``folder``: an FNet (``load_student_folder``) or a transformers causal LM."""
    if any_student.folder_model_type(folder, what) == STUDENT_MODEL_TYPE:
        return load_student_folder(folder, what)
    return any_student.load_causal_lm(folder, what)


def check_any_vocabulary(model: nn.Module, data: TrainData, what: str = "--resume") -> None:
    """Every id the caches use has a row (a compacted transformers student: in its map)."""
    if not isinstance(model, CausalLMStudent):
        check_student_vocabulary(model.config, data)
        return
    any_student.check_vocabulary(model, data.reader, what)
    if model.vocab_map is not None:
        missing = np.setdiff1d(cache_token_ids(data), np.asarray(model.vocab_map, dtype=np.int64))
        if len(missing):
            raise UserError(f"{what}: the student's compacted vocabulary lacks {len(missing)} token ids the "
                            f"cache uses (e.g. {missing[:5].tolist()}); add --compact-vocab to compact it "
                            "again from this cache")


def _check_positions(model: nn.Module, data: TrainData, what: str) -> None:
    n = getattr(model.config, "max_position_embeddings", None)
    if n is not None and data.longest > n:
        raise UserError(f"{what} has max_position_embeddings={n} but the cache holds sequences of "
                        f"{data.longest} tokens; use a model with more positions")


def init_from_folder(cfg: TrainConfig, data: TrainData) -> nn.Module:
    """``--init-from``: a trained student's (or any stock causal LM's) weights and shape, checked against
    this run's caches (files against the folder's manifest, model type and weights, tokenizer, vocabulary,
    special ids, positions). A transformers model is compacted to the caches' ids with ``--compact-vocab``."""
    folder = cfg.init_from
    if (folder / MANIFEST).exists():
        verify_folder(folder, "--init-from")
    if any_student.folder_model_type(folder, "--init-from") != STUDENT_MODEL_TYPE:
        any_student.check_tokenizer(folder, data.reader, "--init-from")
        model = any_student.load_causal_lm(folder, "--init-from", recompact=not cfg.compact_vocab)
        check_any_vocabulary(model, data, "--init-from")
        if cfg.compact_vocab:
            model = any_student.check_head(any_student.compact(model.lm, cache_token_ids(data).tolist()))
        _check_positions(model, data, f"--init-from {folder}")
        return model
    model = load_student_folder(folder, "--init-from")
    mc = model.config
    try:
        check_student_vocabulary(mc, data)
    except UserError as e:
        raise UserError(f"--init-from {folder} does not fit this cache: {e}") from None
    if (mc.pad_token_id, mc.eos_token_id) != (data.pad_id, data.eos_id):
        raise UserError(f"--init-from {folder} was trained with pad/eos ids {mc.pad_token_id}/"
                        f"{mc.eos_token_id} but the cache's tokenizer has {data.pad_id}/{data.eos_id}; use a "
                        "student trained from a cache of the same tokenizer")
    if data.longest > mc.max_position_embeddings:
        raise UserError(f"--init-from {folder} has max_position_embeddings={mc.max_position_embeddings} but "
                        f"the cache holds sequences of {data.longest} tokens; use one with more positions")
    return model


def check_student_config(cfg: TrainConfig, data: TrainData) -> None:
    """``--student-config``: a student's config (its ``model_type``, when given, is ``causal_stft_fnet``);
    with ``--compact-vocab`` a vocabulary (``vocab_size``, or a compacted config's ``full_vocab_size``) of
    the cache's teacher or tokenizer only. What is not JSON is left to ``student_model_config`` to report."""
    path = cfg.student_config
    if path is None:
        return
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(d, dict):
        return
    kind = d.get("model_type")
    if kind is not None and kind != STUDENT_MODEL_TYPE and cfg.student != "fnet" and kind != cfg.student:
        raise UserError(f"--student-config {path} is the config of a {kind!r} model but --student is "
                        f"{cfg.student!r}; drop one of them")
    if not cfg.compact_vocab:
        return
    vocab = d.get("full_vocab_size") if d.get("vocab_map") is not None else d.get("vocab_size")
    ours = {data.reader.vocab_size, tokenizer_info(data.reader).get("vocab_size")}
    if vocab is not None and vocab not in ours:
        raise UserError(f"--student-config {path} has a vocabulary of {vocab} ids but the cache's has "
                        f"{data.reader.vocab_size}; --compact-vocab builds the student's vocabulary from the "
                        "cache and would replace it: drop vocab_size / vocab_map from the config, or drop "
                        "--compact-vocab")


def student_kind(cfg: TrainConfig) -> str:
    """``causal_stft_fnet`` or the transformers ``model_type`` of the student ``cfg`` builds from scratch."""
    if cfg.student_config is not None:
        try:
            d = json.loads(cfg.student_config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            d = None  # student_model_config reports it
        if isinstance(d, dict) and d.get("model_type") not in (None, STUDENT_MODEL_TYPE):
            return d["model_type"]
    return STUDENT_MODEL_TYPE if cfg.student == "fnet" else any_student.ARCHITECTURES[cfg.student]


def build_student(cfg: TrainConfig, data: TrainData) -> nn.Module:
    """A new student for ``cfg`` (torch's RNG seeded with ``cfg.seed`` just before the weights are drawn):
    the FNet from ``student_model_config``, or a transformers model from ``--student`` at the shape options
    or from a ``--student-config`` of another ``model_type``, its vocabulary covering the cache's."""
    check_student_config(cfg, data)
    if student_kind(cfg) == STUDENT_MODEL_TYPE:
        mc = student_model_config(cfg, data)
        torch.manual_seed(cfg.seed)
        return CausalFNetForCausalLM(mc)
    reader = data.reader
    if cfg.student_config is not None:
        d = _read_json(cfg.student_config, "--student-config")
        d.setdefault("vocab_size", reader.vocab_size)
        config = any_student.config_from_json(d, f"--student-config {cfg.student_config}")
    else:
        config = any_student.architecture_config(cfg.student, vocab_size=reader.vocab_size,
                                                 hidden_size=cfg.hidden_size, layers=cfg.layers, ffn=cfg.ffn,
                                                 heads=cfg.heads, max_positions=cfg.max_positions)
    config.pad_token_id, config.eos_token_id = data.pad_id, data.eos_id
    where = "--student-config" if cfg.student_config is not None else f"--student {cfg.student}"
    if config.vocab_size < reader.vocab_size:
        raise UserError(f"{where}: vocab_size {config.vocab_size} does not cover the cache's "
                        f"{reader.vocab_size} ids (the teacher's logits width); use vocab_size >= "
                        f"{reader.vocab_size} or drop it from the config")
    vocab_map = cache_token_ids(data).tolist() if cfg.compact_vocab else None
    torch.manual_seed(cfg.seed)
    model = any_student.new_student(config, vocab_map, config.vocab_size)
    _check_positions(model, data, where)
    return model


# ------------------------------------------------------------------------------------------------- resume


def resume_config(cfg: TrainConfig, ckpt: Path) -> TrainConfig:
    """The config to resume with, after checking the checkpoint's files against its manifest. With
    ``--extend`` the schedule is the checkpoint's (``warmup``; the cosine over its ``schedule_steps``, else
    its ``steps``) and ``--steps`` may only grow; the steps beyond the schedule run at ``min_lr``."""
    verify_folder(ckpt, "--resume")
    try:
        saved = json.loads((ckpt / TRAIN_CONFIG).read_text())["config"]
        saved_steps = int(saved["steps"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"--resume: {ckpt / TRAIN_CONFIG} is unreadable ({e}); start a new --out") from None
    if not cfg.extend:
        if saved.get("schedule_steps") is not None:
            raise UserError(f"--resume: the run in {cfg.out} was extended to {saved_steps} steps with "
                            f"--extend; resume it with --extend --steps {saved_steps} (or more)")
        return cfg
    if cfg.steps < saved_steps:
        raise UserError(f"--extend: --steps {cfg.steps} is below the checkpoint's {saved_steps}; pass a "
                        "larger --steps")
    return replace(cfg, warmup=int(saved["warmup"]),
                   schedule_steps=int(saved.get("schedule_steps") or saved_steps))


def check_resume(cfg: TrainConfig, ckpt: Path, data: TrainData) -> dict[str, Any]:
    """The checkpoint's trainer state, after checking that it was made by this config on these caches
    (``resume_config`` has checked its files against its manifest)."""
    try:
        saved_cfg = json.loads((ckpt / TRAIN_CONFIG).read_text())["config"]
        prov = json.loads((ckpt / PROVENANCE).read_text())
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {ckpt} is not a complete checkpoint ({e}); start a new --out") from None
    now = recorded_config(cfg)
    grows = {"steps", "schedule_steps"} if cfg.extend else set()  # set by resume_config
    # a setting added after the checkpoint was written reads as its default there
    saved_cfg = {**{f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}, **saved_cfg}
    if now["hidden_size"] is None:  # the shape came from --student-config / --init-from (older checkpoints
        saved_cfg.update(dict.fromkeys(SHAPE_FIELDS))  # recorded the unused options' values)
    diff = [f"{k}: {saved_cfg.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now
            if k not in RESUME_FREE | grows and saved_cfg.get(k) != now[k]]
    if prov.get("cache_fingerprint_digest") != data.fingerprint_digest:
        diff.append(f"cache fingerprint: {prov.get('cache_fingerprint_digest')} in the checkpoint, "
                    f"{data.fingerprint_digest} for --cache {', '.join(map(str, cfg.caches))}")
    val_digest = data.val_reader.fingerprint_digest if data.val_reader is not None else None
    if cfg.val_cache is not None and prov.get("val_cache_fingerprint_digest") != val_digest:
        diff.append(f"validation cache fingerprint: {prov.get('val_cache_fingerprint_digest')} in the "
                    f"checkpoint, {val_digest} for --val-cache {cfg.val_cache}")
    if diff:
        raise UserError(f"--resume: {ckpt} was made with other settings ({'; '.join(diff)}); resume with the "
                        "same options and cache, or start a new --out")
    try:
        return torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        raise UserError(f"--resume: {ckpt / TRAINER_STATE} cannot be read ({str(e).splitlines()[0]}); "
                        "start a new --out") from None
