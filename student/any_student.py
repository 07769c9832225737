"""Any transformers causal LM as the student: ``CausalLMStudent`` gives a stock ``AutoModelForCausalLM``
(Qwen2, Llama, a pretrained folder, a model cut from the teacher) the interface the training loop reads
from the FNet: ``hidden_states(input_ids, attention_mask)``, ``get_output_embeddings().weight`` and
``shared_kernels(max_len)`` (a no-op here). The loop, the chunked loss, checkpoints and resume are the same.

Logits are ``hidden @ W.T (+ bias)``; ``check_head`` refuses an architecture whose logits are anything else
(soft-capping, logit scales), since the chunked loss only sees the head weight.

Vocabulary compaction (``--compact-vocab``) for a stock architecture: the model holds one embedding/head row
per token id the caches use plus ONE shared row that stands for every other id. Saved (``save_pretrained``),
it is expanded back to a plain full-vocabulary model of the same architecture (the shared row copied to every
unused id), so ``AutoModelForCausalLM.from_pretrained`` loads it without remote code and returns logits over
tokenizer ids. Training computes exactly that expanded model's softmax: the shared row's logit enters the
normaliser once per unused id (``+ log(unused)``, a constant column appended to the head; ``T * log(unused)``
for the KD softmax at temperature T, ``tempered_head``), so its loss is the saved model's loss, and the shared
row learns to keep the unused ids' logits low. ``compact_vocab.json``
beside the weights records the map, so ``--resume`` rebuilds the same compact model bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cache.util import UserError, atomic_write_json

FNET = "fnet"
# --student names of stock architectures, sized by the shape options (--hidden-size, --layers, --ffn,
# --heads, --max-positions); any other transformers model type comes through --student-config.
ARCHITECTURES = {"qwen2": "qwen2", "llama": "llama"}
COMPACT_VOCAB = "compact_vocab.json"
SPECIAL = ("pad_token_id", "bos_token_id", "eos_token_id")  # tokenizer ids, kept out of a compact config
_DROPPED_FIELDS = ("architectures", "transformers_version", "auto_map", "dtype", "torch_dtype",
                   "_name_or_path")


class _HeadView:
    """What the chunked loss multiplies the hidden states by: ``weight`` (rows, d [+ 1])."""

    def __init__(self, weight: Tensor):
        self.weight = weight


class CausalLMStudent(nn.Module):
    """A transformers causal LM as the student. ``lm`` is the model (its vocabulary is the compact rows + 1
    when ``vocab_map`` is given); ``vocab_map`` the sorted tokenizer ids of those rows; ``full_vocab_size``
    the tokenizer's id range."""

    def __init__(self, lm: nn.Module, vocab_map: list[int] | None = None, full_vocab_size: int | None = None,
                 special: dict[str, Any] | None = None, generation_config=None):
        super().__init__()
        self.lm = lm
        # the saved (full-vocabulary) model's pad/bos/eos ids and generation config: a compact model's
        # config holds rows, not tokenizer ids
        self.special = dict(special or {})
        self.full_generation_config = generation_config
        self.vocab_map = None if vocab_map is None else [int(i) for i in vocab_map]
        self.full_vocab_size = None if full_vocab_size is None else int(full_vocab_size)
        self.unused = 0 if self.vocab_map is None else self.full_vocab_size - len(self.vocab_map)
        if self.vocab_map is not None:
            rows = len(self.vocab_map) + (1 if self.unused else 0)
            if lm.config.vocab_size != rows:
                raise ValueError(f"a compacted student needs {rows} rows, its model has "
                                 f"{lm.config.vocab_size}")
            lookup = torch.full((self.full_vocab_size,), -1, dtype=torch.long)
            lookup[torch.tensor(self.vocab_map, dtype=torch.long)] = torch.arange(len(self.vocab_map))
            self.register_buffer("_lookup", lookup, persistent=False)
        # (rows,) added to every row's logit: the head's bias, + log(unused) on the shared row
        offset = None
        if self.unused:
            offset = torch.zeros(lm.config.vocab_size)
            offset[-1] = math.log(self.unused)
        self.register_buffer("_offset", offset, persistent=False)

    @property
    def config(self):
        return self.lm.config

    @property
    def kind(self) -> str:
        return self.lm.config.model_type

    # ----------------------------------------------------------------------------- the loop's interface

    def map_to_compact(self, ids: Tensor) -> Tensor:
        """Tokenizer ids -> head rows; -1 for an id outside a compacted vocabulary (the loss refuses it)."""
        if self.vocab_map is None:
            return ids
        ids = ids.long()
        inside = (ids >= 0) & (ids < self.full_vocab_size)
        return torch.where(inside, self._lookup[ids.clamp(0, self.full_vocab_size - 1)], -1)

    def input_rows(self, ids: Tensor) -> Tensor:
        """Tokenizer ids -> embedding rows: an unused id reads the shared row, as in the saved model."""
        if self.vocab_map is None:
            return ids
        rows = self.map_to_compact(ids)
        return torch.where(rows < 0, len(self.vocab_map), rows)

    def _head_column(self) -> Tensor | None:
        bias = getattr(self.lm.get_output_embeddings(), "bias", None)
        if bias is None:
            return self._offset
        return bias if self._offset is None else bias + self._offset

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) tokenizer ids -> (B, T, d) final hidden states (with a column of ones appended when the
        head carries a bias or the unused ids' constant, see ``get_output_embeddings``)."""
        out = self.lm.base_model(input_ids=self.input_rows(input_ids), attention_mask=attention_mask,
                                 use_cache=False)
        h = out.last_hidden_state  # (B, T, d)
        if self._head_column() is None:
            return h
        return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1)  # (B, T, d + 1)

    def get_output_embeddings(self):
        """The head as the loss sees it: ``.weight`` (rows, d), or (rows, d + 1) with the bias / the unused
        ids' ``log(unused)`` as the last column."""
        head = self.lm.get_output_embeddings()
        col = self._head_column()
        if col is None:
            return head
        return _HeadView(torch.cat([head.weight, col[:, None].to(head.weight.dtype)], 1))

    @property
    def argmax_shift(self) -> Tensor | None:
        """(rows,) to subtract from the head's logits before an argmax: the shared row's ``log(unused)``."""
        return self._offset

    def tempered_head(self, temperature: float) -> _HeadView | None:
        """The head for the KD softmax at ``temperature`` when it differs from ``get_output_embeddings()``:
        the unused ids count ``unused * exp(s / T)``, so their constant column is ``T * log(unused)``. None
        when the plain head is exact (no shared row, or T = 1)."""
        if not self.unused or temperature == 1.0:
            return None
        head = self.lm.get_output_embeddings()
        col = self._offset * temperature
        bias = getattr(head, "bias", None)
        col = col if bias is None else col + bias
        return _HeadView(torch.cat([head.weight, col[:, None].to(head.weight.dtype)], 1))

    def shared_kernels(self, max_len: int | None = None):
        return contextlib.nullcontext()

    def activation_checkpointing_enable(self, kwargs: dict | None = None) -> None:
        if hasattr(self.lm, "activation_checkpointing_enable"):
            self.lm.activation_checkpointing_enable(kwargs)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -------------------------------------------------------------------------- logits and the saved form

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits over tokenizer ids (B, T, V): the saved model's logits."""
        h = self.hidden_states(input_ids, attention_mask)
        w = self.get_output_embeddings().weight
        logits = h @ w.T  # (B, T, rows)
        if self.vocab_map is None:
            return logits
        if self._offset is not None:
            logits = logits - self._offset  # the constant is the normaliser's, not a logit
        full = torch.index_select(logits, -1, self.input_rows(torch.arange(self.full_vocab_size,
                                                                           device=logits.device)))
        return full

    def expanded(self) -> nn.Module:
        """The plain full-vocabulary model this student stands for (itself without compaction)."""
        if self.vocab_map is None:
            return self.lm
        cfg = type(self.lm.config).from_dict({**self.lm.config.to_dict(), "vocab_size": self.full_vocab_size,
                                              **self.special})
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # saving never moves the training RNG
            full = type(self.lm)(cfg)
        rows = self.input_rows(torch.arange(self.full_vocab_size, device=self._lookup.device))
        state = {k: (v.index_select(0, rows) if _is_vocab_tensor(self.lm, k, v) else v)
                 for k, v in self.lm.state_dict().items()}
        full.load_state_dict(state, assign=True)
        _copy_buffers(full, self.lm)
        full.tie_weights()
        full.generation_config = self.full_generation_config or GenerationConfig.from_model_config(cfg)
        return full

    def save_pretrained(self, folder: Path) -> None:
        """The expanded model (``from_pretrained`` needs no remote code) and, when compacted, its map."""
        self.expanded().save_pretrained(folder)
        if self.vocab_map is not None:
            atomic_write_json(Path(folder) / COMPACT_VOCAB, {"vocab_map": self.vocab_map,
                                                             "full_vocab_size": self.full_vocab_size})


def _copy_buffers(dst: nn.Module, src: nn.Module) -> None:
    """The buffers ``load_state_dict`` leaves on the meta device (non-persistent ones, e.g. RoPE's
    ``inv_freq``), copied from the model of the same architecture ``dst`` was made from."""
    theirs = dict(src.named_buffers())
    for name, buf in list(dst.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            dst.get_submodule(owner).register_buffer(leaf, theirs[name].clone(), persistent=False)


def _is_vocab_tensor(lm: nn.Module, key: str, value: Tensor) -> bool:
    """The input embedding and the head (weight and bias) have one row per vocabulary entry."""
    names = {n for n, m in lm.named_modules() if m is lm.get_input_embeddings() or m is
             lm.get_output_embeddings()}
    return key.rsplit(".", 1)[0] in names and value.shape[0] == lm.config.vocab_size


def compact(lm: nn.Module, vocab_map: list[int]) -> CausalLMStudent:
    """A full-vocabulary model restricted to ``vocab_map`` (sorted tokenizer ids) + one shared row for the
    other ids (the unused rows' value when they are all equal, as in a folder this module saved, else their
    mean). Its logits at the kept ids equal the full model's when the unused rows are all equal."""
    vm = sorted({int(i) for i in vocab_map})
    full_size = lm.config.vocab_size
    if vm[0] < 0 or vm[-1] >= full_size:
        raise UserError(f"the vocabulary map holds ids outside the model's {full_size} rows")
    keep = torch.tensor(vm, dtype=torch.long)
    unused_mask = torch.ones(full_size, dtype=torch.bool)
    unused_mask[keep] = False

    def rows(t: Tensor) -> Tensor:
        kept = t.index_select(0, keep)
        if not unused_mask.any():
            return kept
        rest = t[unused_mask]
        shared = rest[0] if bool((rest == rest[0]).all()) else rest.mean(0)
        return torch.cat([kept, shared[None]], 0)

    special = {k: getattr(lm.config, k, None) for k in SPECIAL}
    cfg = type(lm.config).from_dict({**lm.config.to_dict(), **dict.fromkeys(SPECIAL),
                                     "vocab_size": len(vm) + int(bool(unused_mask.any()))})
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        small = type(lm)(cfg)
    state = {k: (rows(v) if _is_vocab_tensor(lm, k, v) else v) for k, v in lm.state_dict().items()}
    small.load_state_dict(state, assign=True)
    _copy_buffers(small, lm)
    small.tie_weights()
    small.train(lm.training)
    return CausalLMStudent(small, vm, full_size, special, lm.generation_config)


# ------------------------------------------------------------------------------------------- building


def architecture_config(name: str, *, vocab_size: int, hidden_size: int, layers: int, ffn: int,
                        heads: int | None, max_positions: int):
    """The config of ``--student NAME`` at the shape options: tied embeddings, as many key/value heads as
    query heads, ``heads`` default ``hidden_size // 64`` (at least 1)."""
    heads = heads or max(1, hidden_size // 64)
    if hidden_size % heads:
        raise UserError(f"--hidden-size {hidden_size} is not a multiple of --heads {heads}; pick heads that "
                        "divide it")
    return AutoConfig.for_model(ARCHITECTURES[name], vocab_size=vocab_size, hidden_size=hidden_size,
                                num_hidden_layers=layers, intermediate_size=ffn, num_attention_heads=heads,
                                num_key_value_heads=heads, max_position_embeddings=max_positions,
                                tie_word_embeddings=True)


def config_from_json(d: dict[str, Any], where: str):
    """A stock transformers config from the fields of a ``--student-config`` JSON (its ``model_type``)."""
    d = {k: v for k, v in d.items() if k not in _DROPPED_FIELDS}
    kind = d.pop("model_type")
    try:
        return AutoConfig.for_model(kind, **d)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: transformers cannot build a {kind!r} config "
                        f"({str(e).splitlines()[0][:200]}); give the model_type of an architecture "
                        "transformers includes (e.g. qwen2, llama) and its config fields") from None


def new_student(config, vocab_map: list[int] | None, full_vocab_size: int) -> CausalLMStudent:
    """A randomly initialised student of ``config`` (torch's RNG as seeded by the caller); compacted to
    ``vocab_map`` when given (the model is built with the compact rows + the shared row directly)."""
    if vocab_map is None:
        return check_head(CausalLMStudent(AutoModelForCausalLM.from_config(config)))
    vm = sorted(int(i) for i in vocab_map)
    rows = len(vm) + (1 if full_vocab_size > len(vm) else 0)
    special = {k: getattr(config, k, None) for k in SPECIAL}
    cfg = type(config).from_dict({**config.to_dict(), **dict.fromkeys(SPECIAL), "vocab_size": rows})
    return check_head(CausalLMStudent(AutoModelForCausalLM.from_config(cfg), vm, full_vocab_size, special))


def check_head(student: CausalLMStudent) -> CausalLMStudent:
    """Refuse an architecture whose logits are not ``last hidden state @ head.T (+ bias)`` (the chunked loss
    computes exactly that), checked on a few tokens with the RNG untouched."""
    lm = student.lm
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        was = lm.training
        lm.eval()
        ids = torch.arange(min(5, lm.config.vocab_size))[None]
        try:
            want = lm(input_ids=ids, use_cache=False).logits
            h = lm.base_model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            lm.train(was)
        head = lm.get_output_embeddings()
        got = h @ head.weight.T + (0 if getattr(head, "bias", None) is None else head.bias)
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-4):
        raise UserError(f"a {student.kind!r} student's logits are not its last hidden states times its "
                        "output embeddings (logit scaling or soft-capping), which the chunked loss computes; "
                        "choose another architecture")
    return student


# -------------------------------------------------------------------------------------------- loading


def folder_model_type(folder: Path, what: str) -> str | None:
    """``model_type`` from ``folder/config.json`` (None when it has none); one line when unreadable."""
    try:
        d = json.loads((Path(folder) / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: {folder} has no config.json; pass a model folder (save_pretrained)") \
            from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what}: {folder}/config.json is not valid JSON ({e})") from None
    return d.get("model_type") if isinstance(d, dict) else None


def refuse_partial_load(info: dict, what: str, folder: Path, hint: str) -> None:
    """One line when ``from_pretrained(..., output_loading_info=True)`` left tensors missing, unexpected or
    of another shape (transformers only warns and initialises them at random)."""
    bad = sorted({str(k) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                  for k in info.get(key) or ()})
    if bad:
        raise UserError(f"{what}: the weights in {folder} do not fit its config.json ({len(bad)} tensors "
                        f"missing, unexpected or of another shape, e.g. {bad[0]}); pass {hint}")


def load_causal_lm(folder: Path, what: str, recompact: bool = True) -> CausalLMStudent:
    """A stock causal LM saved in ``folder`` (fp32, no remote code), compacted again (``recompact``) when the
    folder was a compacted student (``compact_vocab.json``). One line when it does not load or its weights
    do not fill its config."""
    folder = Path(folder)
    kind = folder_model_type(folder, what)
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                                        trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{what}: the {kind!r} model in {folder} does not load with transformers' own "
                        f"classes ({str(e).splitlines()[0][:300]}); pass a folder of a causal LM that "
                        "transformers includes (no remote code) or a train-student folder") from None
    refuse_partial_load(info, what, folder, "a complete model folder")
    lm.train()
    side = folder / COMPACT_VOCAB
    if recompact and side.is_file():
        d = json.loads(side.read_text())
        return check_head(compact(lm, d["vocab_map"]))
    return check_head(CausalLMStudent(lm))


def check_tokenizer(folder: Path, reader, what: str) -> None:
    """A folder that carries a tokenizer must carry the cache's: same token -> id table as the cache's
    ``tokenizer/`` (or, for a cache without one, as many tokens as its manifest records)."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    try:
        ours = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{what}: the tokenizer in {folder} does not load ({str(e).splitlines()[0][:200]})") \
            from None
    theirs_dir = reader.tokenizer_dir
    if theirs_dir is not None and theirs_dir.is_dir():
        theirs = AutoTokenizer.from_pretrained(theirs_dir)
        a, b = ours.get_vocab(), theirs.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:1]
            raise UserError(f"{what}: {folder} holds another tokenizer than the cache {reader.path} "
                            f"({len(a)} vs {len(b)} tokens, e.g. {diff[0][0]!r}); a student reads the "
                            "cache's token ids, so use a cache built with this model's tokenizer (or a "
                            "model of the teacher's)")
        return
    n = (reader.manifest.get("tokenizer") or {}).get("vocab_size")
    if n is not None and len(ours) != n:
        raise UserError(f"{what}: {folder} holds a tokenizer of {len(ours)} tokens but the cache "
                        f"{reader.path} was made with one of {n}; use a cache built with this model's "
                        "tokenizer")


def check_vocabulary(student: CausalLMStudent, reader, what: str) -> None:
    """The student has a row (a logit) for every id the teacher scored."""
    size = student.full_vocab_size if student.vocab_map is not None else student.config.vocab_size
    if size < reader.vocab_size:
        raise UserError(f"{what}: the {student.kind!r} student's vocabulary of {size} ids does not cover the "
                        f"cache's {reader.vocab_size} (the teacher's logits width); give it vocab_size >= "
                        f"{reader.vocab_size} or use a model of the teacher's tokenizer")


def describe(student: CausalLMStudent) -> str:
    """``qwen2: d=256, 4 layers, 4 heads, FFN 1024, vocab ...`` for the start line."""
    c = student.config
    vocab = (f"{len(student.vocab_map)}{' (+1 shared row)' if student.unused else ''}, compacted from "
             f"{student.full_vocab_size}"
             if student.vocab_map is not None else str(c.vocab_size))
    return (f"{student.kind}: d={c.hidden_size}, {c.num_hidden_layers} layers, "
            f"{getattr(c, 'num_attention_heads', '?')} heads, FFN {getattr(c, 'intermediate_size', '?')}, "
            f"vocab {vocab}")


# ------------------------------------------------------------------------------------------ model card


def parameter_count(config: dict[str, Any]) -> int | None:
    """Unique parameters of the transformers model ``config.json`` describes, without allocating it."""
    if "model_type" not in config:
        return None
    try:
        cfg = config_from_json(dict(config), "config.json")
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (UserError, ValueError, KeyError, TypeError):
        return None
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def render_card(config: dict[str, Any], *, train_config: dict[str, Any], provenance: dict[str, Any],
                cache_manifest: dict[str, Any], metrics: dict[str, Any], name: str | None) -> str:
    """``README.md`` of a transformers student folder: what it is, how it was trained, how to load it."""
    fp = cache_manifest.get("fingerprint") or {}
    teacher = fp.get("teacher")
    if isinstance(teacher, dict):
        teacher = teacher.get("id") or "a local model"
    kind = config.get("model_type")

    def table(rows: list[tuple[str, Any]]) -> list[str]:
        rows = [(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in rows
                if v is not None]
        return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]] if rows else ["(not recorded)"]

    n = parameter_count(config)
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        f"tags: [knowledge-distillation, {kind}]", "---", "",
        f"# {name + ': ' if name else ''}{kind} student" + (f" distilled from {teacher}" if teacher else ""),
        "",
        f"A stock transformers `{kind}` model trained by offline knowledge distillation from a cache of the "
        "teacher's sparse next-token distributions with fnet-distill"
        + (f" {provenance['code_version']}." if provenance.get("code_version") else "."), "",
        "## Model",
        *table([("parameters", n), ("vocabulary", config.get("vocab_size")),
                ("hidden size", config.get("hidden_size")), ("layers", config.get("num_hidden_layers")),
                ("attention heads", config.get("num_attention_heads")),
                ("key/value heads", config.get("num_key_value_heads")),
                ("FFN size", config.get("intermediate_size")),
                ("positions", config.get("max_position_embeddings"))]),
        "",
        "## Training",
        *table([("teacher", teacher), ("cache", provenance.get("cache")),
                ("optimizer steps", provenance.get("step")), ("tokens seen", provenance.get("tokens")),
                ("loss", train_config.get("kd")), ("alpha (CE weight)", train_config.get("alpha")),
                ("KD temperature", train_config.get("temperature")),
                ("compact vocabulary during training", train_config.get("compact_vocab")),
                ("initialised from", train_config.get("init_from")), ("seed", train_config.get("seed"))]),
        "",
        "## Validation",
        *(table([(k, v) for k, v in metrics.items() if k != "event"]) if metrics
          else ["No validation was run for this folder."]),
        "",
        "## Use",
        "A plain transformers model (no remote code); `model(ids).logits` are over tokenizer ids:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "tok = AutoTokenizer.from_pretrained(DIR)",
        "model = AutoModelForCausalLM.from_pretrained(DIR).eval()",
        "```",
        "",
        *(["Trained with a compacted vocabulary: the ids the caches never used share one embedding/head row "
           f"(`{COMPACT_VOCAB}` lists the others); the loss counted their probability, so their logits are "
           "as low as training made them, not -inf.", ""] if train_config.get("compact_vocab") else []),
    ])
