"""The causal STFT FNet student as Hugging Face model classes: layers, ``CausalFNetModel`` (hidden states),
``CausalFNetForCausalLM`` (+ head, loss, ``generate`` on the rolling window state).

The mixing layer's mathematics (its kernel, the causal convolution) is in ``stft.py``, the decoding state in
``decoding.py``, the hyper-parameters in ``configuration_causal_fnet.py``. These four files import only torch
and transformers and each other (relatively): ``save_pretrained`` copies them beside the weights and writes an
``auto_map``, so a saved student loads with ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` where this project is not installed. Vocabulary compaction, the default config and
the model card are project-side (``student/modeling.py``, ``student/model_card.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, cached_file

from .configuration_causal_fnet import CausalFNetConfig, ModelInputError
from .decoding import RollingStateCache, generate_tokens
from .stft import causal_stft_mix, stft_kernel, stft_kernel_grad

# ------------------------------------------------------------------------------------------ layers


class CausalSTFT(nn.Module):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.window = config.stft_window_size
        self.impl = config.stft_impl
        self.projection = nn.Linear(self.window * config.hidden_size, config.hidden_size)
        self._shared: torch.Tensor | None = None
        self._cached: torch.Tensor | None = None
        self._cached_key: tuple | None = None
        self._decode: torch.Tensor | None = None
        self._decode_key: tuple | None = None

    def clear_cache(self) -> None:
        """Forget the cached kernels. Kernels are cached in eval mode only, keyed by the weight's version
        counter; torch's fused optimizers (AdamW(fused=True), the default on CUDA and CPU here) update weights
        in place without bumping it, so ``model.train()``/``model.eval()`` clear the cache: an evaluation
        after training steps never reads kernels of older weights, whatever updated them."""
        self._cached = self._cached_key = self._decode = self._decode_key = None

    def kernel(self, length: int | None = None) -> torch.Tensor:
        """(d_out, taps, d) fp32, the last taps of the window. Shared within ``model.shared_kernels()``;
        cached (all W taps) per weight version in eval mode when no gradient is needed (see ``clear_cache``);
        otherwise recomputed, only the min(W, length) taps a length-``length`` sequence can reach."""
        if self._shared is not None:
            return self._shared
        w = self.projection.weight
        if self.training or (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
            return stft_kernel(w, self.window, None if length is None else min(self.window, length))
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if self._cached_key != key:
            self._cached = stft_kernel(w.detach(), self.window)
            self._cached_key = key
        return self._cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel(x.shape[1])
        if k.shape[1] < min(self.window, x.shape[1]):
            raise ModelInputError(f"a sequence of {x.shape[1]} positions needs "
                                  f"{min(self.window, x.shape[1])} kernel taps but "
                                  f"shared_kernels(max_len=...) built {k.shape[1]}; pass the longest "
                                  "sequence length of the step as max_len")
        return causal_stft_mix(x, k, self.projection.bias, self.impl)

    def decode_kernel(self) -> torch.Tensor:
        """(d_out, W*d) fp32 kernel for one new position, with the block's residual folded into the newest
        tap (K[:, W-1, :] + I): ``window @ kernel.T + bias`` is ``x + mixed`` in one matmul. Cached per weight
        version in eval mode, like ``kernel()``."""
        w = self.projection.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if self.training or self._decode_key != key:
            with torch.no_grad():
                k = stft_kernel(w.detach(), self.window).clone()  # (d_out, W, d)
                k[:, -1].diagonal().add_(1.0)
            if self.training:
                return k.flatten(1)
            self._decode, self._decode_key = k.flatten(1), key
        return self._decode

    def step(self, window: torch.Tensor) -> torch.Tensor:
        """x + mixed for one new position from its window (B, W*d) fp32, oldest first: one addmm."""
        bias = self.projection.bias
        if bias is None:
            return window @ self.decode_kernel().T
        return torch.addmm(bias.float(), window, self.decode_kernel().T)


class CausalFNetEmbeddings(nn.Module):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, compact_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # compact_ids (B, T) with -1 for tokens outside a compacted vocabulary: embedded as zero vectors.
        words = self.word_embeddings(compact_ids.clamp(min=0))  # (B, T, d)
        if (compact_ids < 0).any():
            words = words * (compact_ids >= 0)[..., None].to(words.dtype)
        return self.dropout(self.norm(words + self.pos_embeddings(position_ids)))


class CausalFNetFFN(nn.Module):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.dense1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense2(self.act(self.dense1(x))))


class CausalFNetBlock(GradientCheckpointingLayer):
    def __init__(self, config: CausalFNetConfig):
        super().__init__()
        self.causal_stft = CausalSTFT(config)
        self.ffn = CausalFNetFFN(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        # keep (B, T, 1): 0 at padding, so padded positions enter every window as the zeros of t < 0.
        mixed = self.causal_stft(x if keep is None else x * keep)
        x = self.norm1(x + mixed)
        return self.norm2(x + self.ffn(x))

    def step(self, x: torch.Tensor, cache: RollingStateCache, layer: int) -> torch.Tensor:
        """One new position x (B, d) -> (B, d); its mixer input goes into ``cache``. Functional calls only:
        about eight kernels per layer (ring write, 3 addmm, gelu, add, 2 layer norms)."""
        h = self.causal_stft.step(cache.push(layer, x)).to(x.dtype)  # (B, d) = x + mixed
        d = x.shape[-1]
        x = F.layer_norm(h, (d,), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        ffn = self.ffn
        u = F.gelu(torch.addmm(ffn.dense1.bias, x, ffn.dense1.weight.T))  # (B, FFN)
        y = torch.addmm(ffn.dense2.bias, u, ffn.dense2.weight.T).add_(x)
        return F.layer_norm(y, (d,), self.norm2.weight, self.norm2.bias, self.norm2.eps)


# The model card and the training run's record in a saved folder: a model loaded from the folder carries
# them (a few kB) and writes them again with save_pretrained. Not manifest.json: it hashes the old files.
RUN_FILES = ("README.md", "train_config.json", "provenance.json")


def _read_run_files(path: str | os.PathLike, kwargs: dict) -> dict[str, bytes]:
    """The ``RUN_FILES`` a folder or Hub repository holds (those it lacks are skipped; never an error)."""
    found: dict[str, bytes] = {}
    sub = kwargs.get("subfolder") or ""
    for name in RUN_FILES:
        if os.path.isdir(path):
            file: str | None = os.path.join(path, sub, name)
        else:
            try:
                file = cached_file(path, name, subfolder=sub, cache_dir=kwargs.get("cache_dir"),
                                   revision=kwargs.get("revision"), token=kwargs.get("token"),
                                   local_files_only=kwargs.get("local_files_only", False),
                                   _raise_exceptions_for_missing_entries=False,
                                   _raise_exceptions_for_connection_errors=False)
            except Exception:  # offline, gated, no such repo: the weights loaded, the card is a nicety
                file = None
        if file is not None and os.path.isfile(file):
            with open(file, "rb") as f:
                found[name] = f.read()
    return found


class CausalFNetPreTrainedModel(PreTrainedModel):
    config_class = CausalFNetConfig
    config: CausalFNetConfig
    base_model_prefix = "fnet"  # no wrapper module: the head model holds the base layers itself
    supports_gradient_checkpointing = True
    _no_split_modules = ["CausalFNetBlock"]
    _can_compile_fullgraph = True
    _is_stateful = True  # a rolling state cannot be rolled back: no assisted generation
    run_files: dict[str, bytes] = {}  # RUN_FILES of the folder this model was loaded from (name -> bytes)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        model.run_files = _read_run_files(pretrained_model_name_or_path, kwargs)
        return loaded

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True,
                        **kwargs) -> None:
        """transformers' ``save_pretrained``, plus the model card, ``train_config.json`` and
        ``provenance.json`` of the folder the model was loaded from (written first, so ``push_to_hub``
        uploads them too)."""
        if is_main_process and self.run_files:
            os.makedirs(save_directory, exist_ok=True)
            for name, data in self.run_files.items():
                with open(os.path.join(save_directory, name), "wb") as f:
                    f.write(data)
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)

    def clear_kernel_caches(self) -> None:
        """Drop every layer's cached eval-mode kernels (``CausalSTFT.clear_cache``): call after changing the
        weights in place, in eval mode, by a route that does not bump their version counter (a fused
        optimizer step); ``train()``/``eval()`` call it."""
        for m in self.modules():
            if isinstance(m, CausalSTFT):
                m.clear_cache()

    def train(self, mode: bool = True):
        """``nn.Module.train``/``eval``, clearing the cached kernels: an evaluation after training steps never
        reads kernels of older weights, whatever updated them."""
        self.clear_kernel_caches()
        return super().train(mode)

    @contextlib.contextmanager
    def shared_kernels(self, max_len: int | None = None) -> Iterator[None]:
        """Compute each layer's STFT kernel once for everything inside the block (one optimizer step: all
        micro-batches, gradient-checkpointing recomputes, ...). ``max_len`` (the longest sequence of the
        step) limits the kernels to the min(W, max_len) taps such sequences can reach, which is cheaper when
        W is large; a longer sequence inside the block is then an error. On exit the kernel gradients
        accumulated inside are mapped back and added to the projection weights' ``.grad`` (call
        ``optimizer.step()`` after the block). Not for DistributedDataParallel, whose gradient hooks would
        miss that update."""
        mixers = [m for m in self.modules() if isinstance(m, CausalSTFT)]
        for m in mixers:
            w = m.projection.weight
            taps = None if max_len is None else min(m.window, int(max_len))
            with torch.no_grad():
                m._shared = (stft_kernel(w, m.window) if taps is None else stft_kernel(w, m.window, taps)
                             ).requires_grad_(w.requires_grad)
        try:
            yield
        finally:
            for m in mixers:
                k, m._shared = m._shared, None
                if k is not None and k.grad is not None:
                    w = m.projection.weight
                    g = stft_kernel_grad(k.grad, m.window).to(w.dtype)
                    if w.grad is None:
                        w.grad = g
                    else:
                        w.grad += g


class CausalFNetModel(CausalFNetPreTrainedModel):
    """Embeddings and blocks; returns the final hidden states (blocks are post-norm: no extra final norm)."""

    def __init__(self, config: CausalFNetConfig):
        super().__init__(config)
        self.embeddings = CausalFNetEmbeddings(config)
        self.encoder = nn.ModuleList([CausalFNetBlock(config) for _ in range(config.num_hidden_layers)])
        self._lookup: torch.Tensor | None = None
        if type(self) is CausalFNetModel:  # the head model finishes its own init after adding lm_head
            self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def map_to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids -> row indices of the embedding/head (-1 where a compacted vocabulary lacks the id).
        Identity without compaction."""
        vm = self.config.vocab_map
        if vm is None:
            return ids
        if self._lookup is None or self._lookup.device != ids.device:
            lookup = torch.full((self.config.full_vocab_size,), -1, dtype=torch.long)
            lookup[torch.tensor(vm, dtype=torch.long)] = torch.arange(len(vm))
            self._lookup = lookup.to(ids.device)
        ids = ids.long()
        inside = (ids >= 0) & (ids < self._lookup.numel())
        return torch.where(inside, self._lookup[ids.clamp(0, self._lookup.numel() - 1)], -1)

    def _positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None) -> torch.Tensor:
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if not torch.compiler.is_compiling():
            top = int(position_ids.max()) if position_ids.numel() else 0
            self._check_position(top)
        return position_ids

    def _check_position(self, top: int) -> None:
        if top >= self.config.max_position_embeddings:
            raise ModelInputError(f"sequence reaches position {top} but the model has "
                                  f"max_position_embeddings={self.config.max_position_embeddings}; shorten "
                                  "the input or max_new_tokens")

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      cache: RollingStateCache | None = None) -> torch.Tensor:
        """input_ids (B, T) tokenizer ids, attention_mask (B, T) 0 at padding (left or right) -> (B, T, d).

        With an empty ``cache`` (prefill) the mixer inputs are also kept there; with a ``cache`` that has seen
        tokens, ``input_ids`` are the next tokens after them (left padding only) and each costs one step of
        O(W d^2) per layer, whatever the length so far."""
        if cache is not None and cache.seen > 0:
            return self._decode(input_ids, cache)
        position_ids = self._positions(input_ids, attention_mask, position_ids)
        x = self.embeddings(self.map_to_compact(input_ids), position_ids)  # (B, T, d)
        keep = None
        if attention_mask is not None and not bool(attention_mask.all()):
            keep = attention_mask[..., None].to(x.dtype)  # (B, T, 1)
        for i, block in enumerate(self.encoder):
            if cache is not None:
                cache.fill(i, x if keep is None else x * keep)
            x = block(x, keep)
        if cache is not None:
            nxt = (attention_mask.long().sum(-1) if attention_mask is not None
                   else position_ids[:, -1] + 1)  # (B,) next position per row
            cache.advance(input_ids.shape[1], nxt.to(cache.positions.device))
        return x

    def _decode(self, input_ids: torch.Tensor, cache: RollingStateCache) -> torch.Tensor:
        """(B, n) next tokens after those ``cache`` has seen -> (B, n, d), one position at a time."""
        outs = []
        for j in range(input_ids.shape[1]):
            self._check_position(cache.max_position)
            x = self.embeddings(self.map_to_compact(input_ids[:, j:j + 1]), cache.positions[:, None])[:, 0]
            for i, block in enumerate(self.encoder):
                x = block.step(x, cache, i)  # (B, d)
            cache.advance(1)
            outs.append(x)
        return torch.stack(outs, 1)

    def new_cache(self, batch_size: int) -> RollingStateCache:
        """An empty rolling state for ``batch_size`` rows, on the model's device."""
        cfg = self.config
        return RollingStateCache(cfg.num_hidden_layers, batch_size, cfg.stft_window_size, cfg.hidden_size,
                                 self.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self.hidden_states(input_ids, attention_mask, position_ids))


@dataclass
class CausalFNetLMOutput(ModelOutput):
    """``logits`` (B, T, tokenizer ids) unless ``compact_logits``; ``cache`` (the rolling state) when
    ``use_cache``; ``hidden_states[0]`` (B, T, d) with ``return_hidden_only``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: RollingStateCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class CausalFNetForCausalLM(CausalFNetModel, GenerationMixin):
    """The student: ``CausalFNetModel`` + ``lm_head``, parameters named as in the research checkpoints
    (``embeddings.*``, ``encoder.{i}.*``, ``lm_head``).

    ``forward(input_ids)`` takes tokenizer ids and returns logits over tokenizer ids, also for a compacted
    vocabulary (ids outside ``vocab_map`` at -inf), so scoring tools and ``generate`` read the right columns;
    ``compact_logits=True`` returns the model's own rows instead. ``return_hidden_only=True`` returns the
    hidden states (B, T, d) as ``hidden_states[0]`` and no logits, for chunked losses through
    ``get_output_embeddings()`` (training never materialises the logits). ``use_cache=True`` returns a
    ``RollingStateCache``; passing it back with the next tokens continues in O(W d^2) per token and layer.
    """

    _tied_weights_keys = {"lm_head.weight": "embeddings.word_embeddings.weight"}

    def __init__(self, config: CausalFNetConfig):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._vocab_index: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def to_full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., vocab_size) row logits -> (..., output_vocab_size) tokenizer-id logits: the rows' logits
        unchanged at their ids, -inf at ids without a row (compacted) and at ids from ``num_tokenizer_ids``
        on (no token decodes to them), so ``generate`` never emits those."""
        vm, n, width = self.config.vocab_map, self.config.num_tokenizer_ids, self.config.output_vocab_size
        if n is None or n >= width:
            n = None
        if vm is None and n is None:
            return logits
        if self._vocab_index is None or self._vocab_index[0].device != logits.device:
            if vm is None:  # (width,) True at the ids to mask
                self._vocab_index = (torch.arange(width, device=logits.device) >= n, None)
            else:  # tokenizer ids and the rows that give them
                pairs = [(i, r) for r, i in enumerate(vm) if n is None or i < n]
                cols = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=logits.device)
                rows = (None if len(pairs) == len(vm)
                        else torch.tensor([r for _, r in pairs], dtype=torch.long, device=logits.device))
                self._vocab_index = (cols, rows)
        index, rows = self._vocab_index
        if vm is None:
            return logits.masked_fill(index, float("-inf"))
        full = logits.new_full((*logits.shape[:-1], width), float("-inf"))
        full[..., index] = logits if rows is None else logits[..., rows]
        return full

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: RollingStateCache | None = None, use_cache: bool | None = None,
                return_hidden_only: bool = False, compact_logits: bool = False,
                logits_to_keep: int = 0, return_dict: bool | None = None, **kwargs) -> CausalFNetLMOutput:
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if cache is not None and not isinstance(cache, RollingStateCache):
            raise ModelInputError(f"this model's decoding state is a RollingStateCache, not a "
                                  f"{type(cache).__name__}; pass use_cache=True (or the cache a previous "
                                  "call returned) instead")
        if cache is None and use_cache:
            cache = self.new_cache(input_ids.shape[0])
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache)  # (B, T, d)
        if return_hidden_only:
            return CausalFNetLMOutput(hidden_states=(hidden,), cache=cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # (B, T, rows)
        loss = None
        if labels is not None:
            targets = self.map_to_compact(labels[:, 1:])
            targets = torch.where(labels[:, 1:] == -100, -100, targets)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        if not compact_logits:
            logits = self.to_full_vocab(logits)
        return CausalFNetLMOutput(loss=loss, logits=logits, cache=cache)

    # ------------------------------------------------------------------- transformers' generate()

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      attention_mask: torch.Tensor | None = None,
                                      cache: RollingStateCache | None = None, use_cache: bool = True,
                                      **kwargs) -> dict:
        # Feed only the tokens the rolling state has not seen (after the prompt: the last one). The state
        # tracks positions itself; generate's attention mask and position ids matter only at the prefill.
        if cache is None:
            cache = kwargs.get("past_key_values")
        inputs = {"attention_mask": attention_mask, "use_cache": use_cache, "logits_to_keep": 1}
        if isinstance(cache, RollingStateCache) and cache.seen > 0:
            return {**inputs, "input_ids": input_ids[:, cache.seen:], "cache": cache}
        if not use_cache:  # without a state every step recomputes the whole sequence
            return {**inputs, "input_ids": input_ids}
        return {**inputs, "input_ids": input_ids, "position_ids": kwargs.get("position_ids")}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # no key/value cache: the model makes its own state
        return False

    # ------------------------------------------------------------- incremental decoding without generate()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, RollingStateCache]:
        """Run the prompt once. Returns the next-token logits over tokenizer ids (B, V_out) and the state."""
        cache = self.new_cache(input_ids.shape[0])
        x = self.hidden_states(input_ids, attention_mask, None, cache)  # (B, T, d)
        return self.to_full_vocab(self.lm_head(x[:, -1]).float()), cache

    @torch.no_grad()
    def decode_step(self, token_ids: torch.Tensor, cache: RollingStateCache) -> torch.Tensor:
        """Feed one token per row (B,); O(W d^2) per layer whatever the length so far. Updates ``cache``."""
        x = self._decode(token_ids[:, None], cache)[:, 0]  # (B, d)
        return self.to_full_vocab(self.lm_head(x).float())  # (B, V_out)

    def generate_fast(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                      eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled generation with the rolling state, without transformers'
        generation loop (``decoding.generate_tokens``). Prompts may be left-padded (give ``attention_mask``).
        Returns (B, T + new) ids; rows that hit eos are padded after it. Same tokens as ``generate``."""
        return generate_tokens(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_k=top_k, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, generator=generator)


CausalFNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")
