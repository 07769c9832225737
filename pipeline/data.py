"""GSM8K rows -> chat-formatted, tokenized, length-ordered sequences with an assistant-only loss mask.

Loading accepts a Hub id (``datasets.load_dataset``) or a local ``.jsonl`` / ``.parquet`` file (or a folder
holding ``<split>.jsonl`` / ``<split>.parquet``). Formatting uses the tokenizer's own chat template; the
supervised tokens are the answer and the closing eos, and nothing after it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.util import UserError, bytes_hash, json_hash
from pipeline.hub import hub_local_only

OVERFLOW_POLICIES = ("drop", "truncate")
LOCAL_SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class Example:
    """One input row. ``answer`` is None for a question-only row (the teacher writes the answers). A row
    with ``written_by`` holds an answer someone else wrote (a student's, from ``fnet-distill eval
    --answers-out``); its ``reference`` field, when present, is the reference answer to score it against."""

    row: int
    question: str
    answer: str | None
    written_by: str | None = None
    reference: str | None = None


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
    config_name: str = "main"
    limit: int | None = None
    max_length: int = 512
    overflow: str = "drop"

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW_POLICIES:
            raise UserError(f"--overflow must be one of {'|'.join(OVERFLOW_POLICIES)}, got {self.overflow!r}")
        if self.max_length < 8:
            raise UserError(f"--max-length must be at least 8 tokens, got {self.max_length}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be a positive number of rows, got {self.limit}")


def _is_local(dataset: str) -> bool:
    p = Path(dataset).expanduser()
    return p.exists() or dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", ".", "~"))


def _local_file(dataset: str, split: str) -> Path:
    p = Path(dataset).expanduser()
    if p.is_dir():
        for suffix in LOCAL_SUFFIXES:
            if (p / f"{split}{suffix}").exists():
                return p / f"{split}{suffix}"
        raise UserError(f"folder {p} has no {split}.jsonl or {split}.parquet; pass the file as --dataset")
    if not p.exists():
        raise UserError(f"dataset file {p} does not exist; pass an existing .jsonl/.parquet file or a Hub id")
    if p.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"dataset file {p} is neither .jsonl nor .parquet; convert it or pass a Hub id")
    return p


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON ({e.msg}); fix or remove line {lineno}") \
                    from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object with question/answer fields")
            rows.append(obj)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"cannot read parquet file {path} ({e}); check the file") from None


def _read_hub(dataset: str, config_name: str, split: str) -> list[dict[str, Any]]:
    hub_local_only(dataset, flag="--dataset", what="dataset", filename="README.md", repo_type="dataset")
    import datasets

    if not sys.stderr.isatty():  # its bars redraw with carriage returns: one huge line in a log file
        datasets.disable_progress_bars()

    try:
        ds = datasets.load_dataset(dataset, config_name, split=split)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"could not load dataset {dataset!r} (config {config_name!r}, split {split!r}) from the "
            f"Hugging Face Hub ({reason}); if the Hub is unreachable, pass a local path instead, e.g. "
            f"--dataset path/to/{split}.jsonl"
        ) from None
    return [dict(r) for r in ds]


def load_examples(dataset: str, split: str = "train", *, config_name: str = "main",
                  limit: int | None = None, require_answer: bool = True) -> list[Example]:
    """Read rows with non-empty ``question`` and ``answer`` strings (the first ``limit`` rows if given);
    with ``require_answer=False`` the ``answer`` may be absent (None). Optional ``written_by`` and
    ``reference`` strings are kept (``Example``). Errors name 1-based row numbers."""
    if _is_local(dataset):
        path = _local_file(dataset, split)
        raw = _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)
        where = str(path)
    else:
        raw = _read_hub(dataset, config_name, split)
        where = f"{dataset}[{split}]"
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise UserError(f"dataset {where} has no rows; check the path and split")
    examples = []
    for i, obj in enumerate(raw):
        for key in ("question", "answer", "written_by", "reference"):
            value = obj.get(key)
            optional = key in ("written_by", "reference") or (key == "answer" and not require_answer)
            if value is None and optional:
                continue
            if not isinstance(value, str) or not value.strip():
                state = "missing" if value is None else "empty" if isinstance(value, str) else "not a string"
                hint = (" (a question-only file needs teacher-cache --write N: the teacher writes the "
                        "answers)"
                        if key == "answer" and value is None else "")
                raise UserError(f"{where}: row {i + 1}: the {key!r} field is {state}{hint}; fix or remove "
                                "that row")
        examples.append(Example(row=i, question=obj["question"], answer=obj.get("answer"),
                                written_by=obj.get("written_by"), reference=obj.get("reference")))
    return examples


def dataset_hash(examples: list[Example]) -> str:
    """Hash of the rows' text; rows written by someone else also hash who wrote them and the reference."""
    return json_hash([[e.question, e.answer] + ([e.written_by, e.reference] if e.written_by or e.reference
                                                 else []) for e in examples])


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


def format_example(tokenizer: Any, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of the full chat (default system prompt, user question, assistant answer) ending with the
    closing eos, and the index of the first assistant content token."""
    eos_id, _ = special_ids(tokenizer)
    user = [{"role": "user", "content": question}]
    prompt = _chat_ids(tokenizer, user, add_generation_prompt=True)
    chat = user + [{"role": "assistant", "content": answer}]
    full = _chat_ids(tokenizer, chat, add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise UserError("the chat template's prompt-only tokenization is not a prefix of the full chat; "
                        "this tokenizer/template cannot be used for assistant-only supervision")
    tail = full[len(prompt):]
    if eos_id not in tail:
        raise UserError("the chat template does not close the assistant turn with the eos token; "
                        "pass a tokenizer whose eos ends a turn (e.g. <|im_end|>)")
    last = len(tail) - 1 - tail[::-1].index(eos_id)
    ids = prompt + tail[: last + 1]
    return ids, len(prompt)


def tokenize_examples(tokenizer: Any, examples: list[Example], *, max_length: int = 512,
                      overflow: str = "drop") -> TokenizedDataset:
    """Format and tokenize every example, apply the overflow policy, and order by length (longest first,
    ties by row). A truncated row keeps its whole prompt and the start of its answer, without eos; a row
    whose prompt alone leaves no room for one answer token is dropped under either policy."""
    if overflow not in OVERFLOW_POLICIES:
        raise UserError(f"--overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
    kept: list[tuple[int, np.ndarray, int, bool]] = []
    dropped = truncated = 0
    for ex in examples:
        ids, start = format_example(tokenizer, ex.question, ex.answer)
        cut = False
        if len(ids) > max_length:
            if overflow == "drop" or start >= max_length:
                dropped += 1
                continue
            ids, cut = ids[:max_length], True
            truncated += 1
        kept.append((ex.row, np.asarray(ids, dtype=np.int32), start, cut))
    kept.sort(key=lambda r: (-len(r[1]), r[0]))
    seqs = []
    for seq_id, (row, ids, start, cut) in enumerate(kept):
        mask = np.zeros(len(ids), dtype=bool)
        mask[start:] = True
        seqs.append(TokenizedSeq(seq_id, row, ids, mask, start, cut))
    return TokenizedDataset(seqs, dropped, truncated, dataset_hash(examples))


def load_tokenized(tokenizer: Any, cfg: DataConfig) -> TokenizedDataset:
    examples = load_examples(cfg.dataset, cfg.split, config_name=cfg.config_name, limit=cfg.limit)
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
