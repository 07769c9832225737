"""``CausalFNetConfig``: the hyper-parameters of the causal STFT FNet student (``causal_stft_fnet``).

Only transformers is imported here: this file is copied beside the weights of every saved student
(``auto_map`` in its ``config.json``), so the folder loads with ``trust_remote_code=True`` without this
project.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from transformers import PretrainedConfig


class ModelInputError(ValueError):
    """A bad model setting or input (a config value, a sequence past the position table). The message says
    what is wrong and what to do; the project's command line prints it as one line."""


class CausalFNetConfig(PretrainedConfig):
    """Hyper-parameters of the causal STFT FNet.

    ``vocab_map`` (optional, sorted tokenizer ids) turns on vocabulary compaction: the model then has
    ``len(vocab_map)`` embedding/head rows, still reads tokenizer ids, and ``full_vocab_size`` is the
    tokenizer's id range. ``stft_impl`` picks the mixing kernel: "auto" (measured crossover), "conv", "fft".

    ``num_tokenizer_ids`` (optional, ``len(tokenizer)``): logits at ids from there on are -inf. A teacher's
    embedding is often padded past its tokenizer (Qwen2: 151,936 rows, 151,646 ids); the student keeps
    those rows for training (the cached teacher distributions put a little mass there) but never emits them.

    In ``config.json`` a compacted student's ``vocab_size`` is the width of its logits (the tokenizer's id
    range, what tools that read the file without this code expect); loaded, ``vocab_size`` is the number of
    rows again (``len(vocab_map)``). Files written the other way (``vocab_size`` = rows) load the same.
    """

    model_type = "causal_stft_fnet"

    def __init__(
        self,
        vocab_size: int = 151_936,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        intermediate_size: int = 1024,
        hidden_dropout_prob: float = 0.1,
        max_position_embeddings: int = 1024,
        stft_window_size: int = 32,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        vocab_map: list[int] | None = None,
        full_vocab_size: int | None = None,
        stft_impl: str = "auto",
        num_tokenizer_ids: int | None = None,
        **kwargs,
    ):
        if vocab_map is not None and full_vocab_size is not None and int(vocab_size) == int(full_vocab_size):
            vocab_size = len(vocab_map)  # config.json's vocab_size of a compacted student: the logits' width
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.intermediate_size = int(intermediate_size)
        self.hidden_dropout_prob = float(hidden_dropout_prob)
        self.max_position_embeddings = int(max_position_embeddings)
        self.stft_window_size = int(stft_window_size)
        self.initializer_range = float(initializer_range)
        self.layer_norm_eps = float(layer_norm_eps)
        self.vocab_map = None if vocab_map is None else [int(i) for i in vocab_map]
        self.full_vocab_size = None if full_vocab_size is None else int(full_vocab_size)
        self.stft_impl = stft_impl
        self.num_tokenizer_ids = None if num_tokenizer_ids is None else int(num_tokenizer_ids)
        with self._tokenizer_range():  # transformers checks special-token ids against vocab_size here
            super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._validate()

    @contextlib.contextmanager
    def _tokenizer_range(self) -> Iterator[None]:
        """Let transformers' special-token checks see the tokenizer's id range: pad/eos are tokenizer ids,
        which a compacted student's ``vocab_size`` (its rows) need not cover."""
        rows = self.vocab_size
        self.vocab_size = self.output_vocab_size or rows
        try:
            yield
        finally:
            self.vocab_size = rows

    def validate(self) -> None:
        with self._tokenizer_range():
            super().validate()

    def to_json_string(self, use_diff: bool = True) -> str:
        """``config.json``: as transformers writes it, with a compacted student's ``vocab_size`` the width of
        its logits, so that a plain ``PretrainedConfig`` read of the file (``AutoTokenizer`` without
        ``trust_remote_code`` makes one) finds the eos/pad ids inside the vocabulary."""
        text = super().to_json_string(use_diff)
        if self.vocab_map is None:
            return text
        d = json.loads(text)
        d["vocab_size"] = self.full_vocab_size
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "max_position_embeddings", "stft_window_size"):
            if getattr(self, name) < 1:
                raise ModelInputError(f"{name} must be >= 1, got {getattr(self, name)}; "
                                      "pass a positive integer")
        if not 0.0 <= self.hidden_dropout_prob < 1.0:
            raise ModelInputError(f"hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob}")
        if self.stft_impl not in ("auto", "conv", "fft"):
            raise ModelInputError(f"stft_impl must be 'auto', 'conv' or 'fft', got {self.stft_impl!r}")
        if self.vocab_map is not None:
            vm = self.vocab_map
            if len(vm) != self.vocab_size:
                raise ModelInputError(f"vocab_map has {len(vm)} ids but vocab_size is {self.vocab_size}; "
                                      "they must match")
            if any(b <= a for a, b in zip(vm, vm[1:])):
                raise ModelInputError("vocab_map must be strictly increasing tokenizer ids "
                                      "(sorted, no duplicates)")
            if self.full_vocab_size is None or vm[0] < 0 or vm[-1] >= self.full_vocab_size:
                raise ModelInputError(f"vocab_map ids must lie in [0, full_vocab_size="
                                      f"{self.full_vocab_size}); set full_vocab_size to the tokenizer's "
                                      "id range")
        n = self.num_tokenizer_ids
        if n is not None and not 1 <= n <= self.output_vocab_size:
            raise ModelInputError(f"num_tokenizer_ids must be in [1, {self.output_vocab_size}] (the logits' "
                                  f"width), got {n}; set it to len(tokenizer) or leave it out")

    @property
    def output_vocab_size(self) -> int:
        """Width of the logits ``generate`` sees: the tokenizer's id range."""
        return self.full_vocab_size if self.vocab_map is not None else self.vocab_size


CausalFNetConfig.register_for_auto_class()
