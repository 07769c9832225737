"""Where a run's student comes from when it is not built from the plain shape options: a saved student
folder (``--init-from``, ``--resume``) or a ``--student-config`` file, each checked before any training.

A saved folder must hold a student (``model_type`` ``causal_stft_fnet``) whose weights fill its config
exactly (no missing, unexpected or resized tensor): transformers would otherwise load a Qwen2 folder, say,
as a randomly initialised student with a warning. A ``--student-config`` must describe a student, and with
``--compact-vocab`` its vocabulary must be the cache's: compaction builds the vocabulary from the cache and
would silently replace another one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cache.util import UserError
from student.checkpoint import MANIFEST, verify_folder
from student.modeling import CausalFNetConfig, CausalFNetForCausalLM
from student.train_config import TrainConfig
from student.train_data import TrainData, check_student_vocabulary, tokenizer_info

STUDENT_MODEL_TYPE = CausalFNetConfig.model_type


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
    bad = sorted({str(k) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                  for k in info.get(key) or ()})
    if bad:
        raise UserError(f"{what}: the weights in {folder} do not fit its config.json ({len(bad)} tensors "
                        f"missing, unexpected or of another shape, e.g. {bad[0]}); pass a folder written by "
                        "train-student")
    return model


def init_from_folder(cfg: TrainConfig, data: TrainData) -> CausalFNetForCausalLM:
    """``--init-from``: a trained student's weights and shape, checked against this run's caches (files
    against the folder's manifest, model type and weights, vocabulary, special ids, positions)."""
    folder = cfg.init_from
    if (folder / MANIFEST).exists():
        verify_folder(folder, "--init-from")
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
    if kind is not None and kind != STUDENT_MODEL_TYPE:
        raise UserError(f"--student-config {path} is the config of a {kind!r} model, not of a student "
                        f"({STUDENT_MODEL_TYPE!r}); pass a student's config.json (e.g. "
                        "OUT/final/config.json) or a JSON object of CausalFNetConfig fields")
    if not cfg.compact_vocab:
        return
    vocab = d.get("full_vocab_size") if d.get("vocab_map") is not None else d.get("vocab_size")
    ours = {data.reader.vocab_size, tokenizer_info(data.reader).get("vocab_size")}
    if vocab is not None and vocab not in ours:
        raise UserError(f"--student-config {path} has a vocabulary of {vocab} ids but the cache's has "
                        f"{data.reader.vocab_size}; --compact-vocab builds the student's vocabulary from the "
                        "cache and would replace it: drop vocab_size / vocab_map from the config, or drop "
                        "--compact-vocab")
