"""The student model as this project uses it: the portable model files plus what only the project needs.

The model itself lives in four files that import nothing of this project and are saved beside every student's
weights: ``configuration_causal_fnet.py`` (the config), ``stft.py`` (the mixing layer's mathematics),
``decoding.py`` (the rolling window state for ``generate``) and ``modeling_causal_fnet.py`` (the transformers
model classes). This module re-exports them under one name and adds vocabulary compaction (which reads a
teacher cache), the default student config and a parameter count.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from cache.util import UserError
from student.configuration_causal_fnet import CausalFNetConfig, ModelInputError
from student.decoding import RollingStateCache, generate_tokens, pick_next
from student.modeling_causal_fnet import (
    CausalFNetBlock,
    CausalFNetEmbeddings,
    CausalFNetFFN,
    CausalFNetForCausalLM,
    CausalFNetLMOutput,
    CausalFNetModel,
    CausalFNetPreTrainedModel,
    CausalSTFT,
)
from student.stft import (
    FFT_CROSSOVER,
    FFT_MIN_TOKENS,
    FFT_MIN_TOKENS_PER_TAP,
    _FFTCausalConv,
    causal_stft_mix,
    stft_kernel,
    stft_kernel_grad,
)

__all__ = [
    "FFT_CROSSOVER", "FFT_MIN_TOKENS", "FFT_MIN_TOKENS_PER_TAP", "CausalFNetBlock", "CausalFNetConfig",
    "CausalFNetEmbeddings", "CausalFNetFFN", "CausalFNetForCausalLM", "CausalFNetLMOutput", "CausalFNetModel",
    "CausalFNetPreTrainedModel", "CausalSTFT", "ModelInputError", "RollingStateCache", "_FFTCausalConv",
    "causal_stft_mix", "compact_ids_from_cache", "compact_model", "count_parameters", "generate_tokens",
    "pick_next", "stft_kernel", "stft_kernel_grad", "student_config",
]


def compact_ids_from_cache(reader, special_ids: Iterable[int] = ()) -> np.ndarray:
    """Sorted unique token ids used anywhere in a teacher cache (inputs, top-k ids, sampled ids) plus
    ``special_ids`` (eos, pad, chat-template tokens): the ``vocab_map`` of a compacted student."""
    seen = [np.asarray(list(special_ids), dtype=np.int64)]
    for i in range(len(reader)):
        rec = reader[i]
        seen.append(np.unique(np.asarray(rec.input_ids)))
        seen.append(np.unique(np.asarray(rec.topk_ids)))
        if getattr(rec, "sample_ids", None) is not None:
            seen.append(np.unique(np.asarray(rec.sample_ids)))
    return np.unique(np.concatenate(seen)).astype(np.int64)


def compact_model(model: CausalFNetForCausalLM, vocab_map: Iterable[int]) -> CausalFNetForCausalLM:
    """A copy of a full-vocabulary model restricted to ``vocab_map`` (sorted tokenizer ids): same weights,
    only those embedding/head rows. Its logits equal the full model's logits at those ids."""
    if model.config.vocab_map is not None:
        raise UserError("model is already compacted; compact the full-vocabulary model instead")
    vm = sorted({int(i) for i in vocab_map})
    cfg = CausalFNetConfig(**{**model.config.to_dict(), "vocab_size": len(vm), "vocab_map": vm,
                              "full_vocab_size": model.config.vocab_size})
    small = CausalFNetForCausalLM(cfg).to(model.device, model.dtype)
    state = model.state_dict()
    rows = torch.tensor(vm, device=model.device)
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"][rows]
    state["lm_head.weight"] = state["lm_head.weight"][rows]
    small.load_state_dict(state)
    if cfg.tie_word_embeddings:
        small.tie_weights()
    return small


def student_config(vocab_size: int = 151_936, **overrides) -> CausalFNetConfig:
    """The project's default student: d=256, 4 layers, FFN 1024, W=32, 1024 positions."""
    return CausalFNetConfig(vocab_size=vocab_size, **overrides)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
