"""``Example``s (``pipeline.rows``) -> chat-formatted, tokenized, length-ordered sequences with an
assistant-only loss mask. Formatting uses the tokenizer's own chat template; each supervised turn is its
content and the end-of-turn eos the template closes it with, and nothing after the last one. The row
reading and its names are re-exported here (``from pipeline.data import load_examples`` keeps working).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.util import UserError, bytes_hash, json_hash
from pipeline.hub import hub_local_only
from pipeline.rows import (  # noqa: F401  (re-exported: the rows' public names)
    DATA_FORMATS,
    FIELDS,
    FORMAT_KEY,
    LOCAL_SUFFIXES,
    OVERFLOW_POLICIES,
    ROLE_ALIASES,
    ROLES,
    ROW_FORMATS,
    SPLIT_NAMES,
    Example,
    Turn,
    check_data_format,
    dataset_hash,
    detect_format,
    folder_files,
    hub_config,
    load_examples,
    parse_fields,
    read_rows,
)


@dataclass(frozen=True)
class TokenizedSeq:
    """One chat-formatted sequence. ``seq_id`` is its index in the length-ordered list."""

    seq_id: int
    row: int
    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]
    assistant_start: int
    truncated: bool

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class TokenizedDataset:
    seqs: list[TokenizedSeq]
    dropped: int
    truncated: int
    dataset_hash: str

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    @property
    def num_supervised(self) -> int:
        return sum(int(s.loss_mask.sum()) for s in self.seqs)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "openai/gsm8k"
    split: str = "train"
    config_name: str | None = None
    limit: int | None = None
    max_length: int = 512
    overflow: str = "drop"
    data_format: str = "auto"
    fields: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise UserError(f"--overflow must be one of {'|'.join(OVERFLOW_POLICIES)}, got {self.overflow!r}")
        if self.max_length < 8:
            raise UserError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be a positive number of rows, got {self.limit}")
        check_data_format(self.data_format)
        object.__setattr__(self, "fields", parse_fields(self.fields))



def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of what the tokenizer does: its full serialised pipeline (vocab, merges, normalisers), special
    tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return json_hash({
        "backend": bytes_hash(body.encode()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        "chat_template": tokenizer.chat_template,
    })


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(eos_id, pad_id) of the tokenizer, as it defines them; both must exist."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        raise UserError("the tokenizer defines no eos token; pass a chat tokenizer with --tokenizer")
    if pad is None:
        raise UserError("the tokenizer defines no pad token; pass a tokenizer that has one with --tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; pass a chat tokenizer with --tokenizer")
    return int(eos), int(pad)


def chat_prompt_ids(tokenizer: Any, turns: tuple[Turn, ...] | list[Turn]) -> list[int]:
    """Token ids of ``turns`` followed by the template's assistant generation prompt."""
    return _chat_ids(tokenizer, [{"role": t.role, "content": t.content} for t in turns],
                     add_generation_prompt=True)


def format_chat(tokenizer: Any, turns: tuple[Turn, ...] | list[Turn]) -> tuple[list[int], np.ndarray]:
    """Token ids of a conversation up to and including its last supervised turn, and the loss mask: True
    exactly on each supervised turn's content and the eos that closes it (the template's scaffolding,
    system and user turns, and anything after the closing eos are masked).

    Turn i's span starts where the template's rendering of the turns before it plus the generation prompt
    ends, and ends at the last eos of the rendering up to turn i; both renderings must be prefixes of the
    whole conversation's tokens (a template that rewrites earlier turns cannot be supervised this way)."""
    eos_id, _ = special_ids(tokenizer)
    messages = [{"role": t.role, "content": t.content} for t in turns]
    sup = [i for i, t in enumerate(turns) if t.supervised]
    if not sup:
        raise UserError("the conversation has no supervised (assistant) turn")
    full = _chat_ids(tokenizer, messages[: sup[-1] + 1], add_generation_prompt=False)
    spans = []
    for i in sup:
        prompt = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = full if i == sup[-1] else _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(prompt)] != prompt or full[: len(upto)] != upto:
            raise UserError("the chat template's tokens of the conversation up to an assistant turn are not "
                            "a prefix of the whole conversation's; this tokenizer/template cannot be used "
                            "for assistant-only supervision")
        tail = upto[len(prompt):]
        if eos_id not in tail:
            raise UserError("the chat template does not close the assistant turn with the eos token; "
                            "pass a tokenizer whose eos ends a turn (e.g. <|im_end|>)")
        last = len(tail) - 1 - tail[::-1].index(eos_id)
        spans.append((len(prompt), len(prompt) + last + 1))
    ids = full[: spans[-1][1]]
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask[lo:hi] = True
    return ids, mask


def format_example(tokenizer: Any, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the full chat (default system prompt, user question, assistant answer) ending with the
    closing eos, and the index of the first assistant content token."""
    ids, mask = format_chat(tokenizer, (Turn("user", question), Turn("assistant", answer, True)))
    return ids, int(np.flatnonzero(mask)[0])


def tokenize_examples(tokenizer: Any, examples: list[Example], *, max_length: int = 512,
                      overflow: str = "drop") -> TokenizedDataset:
    """Format and tokenize every example, apply the overflow policy, and order by length (longest first,
    ties by row). A truncated row keeps its first ``max_length`` tokens (its prompt and the start of its
    supervised text, without the closing eos); a row with no supervised token within ``max_length`` is
    dropped under either policy."""
    if overflow not in OVERFLOW_POLICIES:
        raise UserError(f"--overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
    kept: list[tuple[int, np.ndarray, np.ndarray, bool]] = []
    dropped = truncated = 0
    for ex in examples:
        try:
            ids, mask = format_chat(tokenizer, ex.chat())
        except UserError as e:
            raise UserError(f"{ex.where}: {e}" if ex.where and ex.turns is not None else str(e)) from None
        start = int(np.flatnonzero(mask)[0])
        cut = False
        if len(ids) > max_length:
            if overflow == "drop" or start >= max_length:
                dropped += 1
                continue
            ids, mask, cut = ids[:max_length], mask[:max_length], True
            truncated += 1
        kept.append((ex.row, np.asarray(ids, dtype=np.int32), mask, cut))
    kept.sort(key=lambda r: (-len(r[1]), r[0]))
    seqs = [TokenizedSeq(seq_id, row, ids, mask, int(np.flatnonzero(mask)[0]), cut)
            for seq_id, (row, ids, mask, cut) in enumerate(kept)]
    return TokenizedDataset(seqs, dropped, truncated, dataset_hash(examples))


def load_tokenized(tokenizer: Any, cfg: DataConfig) -> TokenizedDataset:
    examples = load_examples(cfg.dataset, cfg.split, config_name=cfg.config_name, limit=cfg.limit,
                             data_format=cfg.data_format, fields=cfg.fields)
    return tokenize_examples(tokenizer, examples, max_length=cfg.max_length, overflow=cfg.overflow)


def load_tokenizer(name: str, flag: str = "--tokenizer") -> Any:
    """The tokenizer from a local folder or a Hub id, with one clear line (naming ``flag``, the option that
    gave ``name``) when it is unavailable."""
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not local.is_dir():
        raise UserError(f"tokenizer folder {local} does not exist; pass an existing folder or a Hub id")
    local_only = False if local.is_dir() else \
        hub_local_only(name, flag=flag, what="tokenizer", filename="tokenizer_config.json")
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "from" if local.is_dir() else "from the Hugging Face Hub"
        raise UserError(f"could not load a tokenizer {where} {name!r} ({str(e).splitlines()[0]}); pass a "
                        f"local tokenizer or model folder with {flag}") from None
    special_ids(tok)
    return tok
