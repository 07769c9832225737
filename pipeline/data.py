"""Dataset rows -> chat-formatted, tokenized, length-ordered sequences with an assistant-only loss mask.

Three row formats (``ROW_FORMATS``, detected from the first row or named with ``--data-format``): ``qa``
(GSM8K's question/answer, optional written_by/reference), ``messages`` (a chat: system/user/assistant turns,
every assistant turn supervised) and ``prompt-completion`` (a prompt string or list of turns, and the
completion the model learns). ``--field CANON=COLUMN`` reads a canonical field from another column.

Loading accepts a Hub id (``datasets.load_dataset``), a local ``.jsonl`` / ``.parquet`` file, or a folder
(``folder_files`` says which of its files make a split). Formatting uses the tokenizer's own chat template;
each supervised turn is its content and the end-of-turn eos the template closes it with, and nothing after
the last one.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cache.util import UserError, bytes_hash, json_hash
from pipeline.hub import hub_local_only

OVERFLOW_POLICIES = ("drop", "truncate")
LOCAL_SUFFIXES = (".jsonl", ".parquet")
ROW_FORMATS = ("qa", "messages", "prompt-completion")
DATA_FORMATS = ("auto",) + ROW_FORMATS
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant"}  # ShareGPT's names
# canonical field -> the row formats that read it (role/content: the keys inside each turn of a chat)
FIELDS = {"question": ("qa",), "answer": ("qa",), "written_by": ("qa", "prompt-completion"),
          "reference": ("qa", "prompt-completion"), "messages": ("messages",),
          "prompt": ("prompt-completion",), "completion": ("prompt-completion",),
          "role": ("messages", "prompt-completion"), "content": ("messages", "prompt-completion")}
FORMAT_KEY = {"qa": "question", "messages": "messages", "prompt-completion": "prompt"}  # what marks a row
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
GSM8K_HUB_IDS = ("openai/gsm8k", "gsm8k")


class Turn(NamedTuple):
    """One chat turn; ``supervised`` turns (assistant replies) are what the student learns."""

    role: str
    content: str
    supervised: bool = False


@dataclass(frozen=True)
class Example:
    """One input row. ``answer`` is None for a question-only row (the teacher writes the answers). A row
    with ``written_by`` holds an answer someone else wrote (a student's, from ``fnet-distill eval
    --answers-out``); its ``reference`` field, when present, is the reference answer to score it against.

    A chat row (``kind`` messages or prompt-completion) keeps its whole conversation in ``turns``; its
    ``question`` is then the last user turn before the final supervised one and ``answer`` that turn's text
    (what eval scores and ``--write`` replaces). ``where`` names the row in errors ("FILE: row N")."""

    row: int
    question: str
    answer: str | None
    written_by: str | None = None
    reference: str | None = None
    turns: tuple[Turn, ...] | None = None
    kind: str = "qa"
    where: str = field(default="", compare=False)

    def chat(self) -> tuple[Turn, ...]:
        """The conversation; a qa row is one user turn and, when it has an answer, one assistant turn."""
        if self.turns is not None:
            return self.turns
        user = Turn("user", self.question)
        return (user,) if self.answer is None else (user, Turn("assistant", self.answer, True))

    def prompt_turns(self) -> tuple[Turn, ...]:
        """The turns before the final supervised one (all of them when none is): the prompt that eval and
        ``--write`` answer."""
        turns = self.chat()
        last = max((i for i, t in enumerate(turns) if t.supervised), default=len(turns))
        return turns[:last]

    def without_answer(self) -> Example:
        """The row as a prompt only (what ``--write`` answers)."""
        if self.turns is None:
            return Example(self.row, self.question, None, where=self.where)
        return Example(self.row, self.question, None, turns=self.prompt_turns(), kind=self.kind,
                       where=self.where)

    def answered(self, row: int, text: str) -> Example:
        """Row ``row``: this row's prompt answered by ``text`` (a teacher-written solution)."""
        if self.turns is None:
            return Example(row=row, question=self.question, answer=text)
        return Example(row=row, question=self.question, answer=text, kind=self.kind,
                       turns=self.prompt_turns() + (Turn("assistant", text, True),))


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


def check_data_format(data_format: str) -> None:
    if data_format not in DATA_FORMATS:
        raise UserError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")


def parse_fields(specs: Any) -> tuple[tuple[str, str], ...]:
    """``--field CANON=COLUMN`` values (strings, or pairs already parsed) -> sorted (canon, column) pairs,
    identity mappings left out. One line for a malformed value, an unknown canonical name or a repeat."""
    out: dict[str, str] = {}
    for spec in specs or ():
        if isinstance(spec, str):
            canon, sep, column = (x.strip() for x in spec.partition("="))
            if not sep or not canon or not column:
                raise UserError(f"--field {spec!r} is not CANON=COLUMN; pass e.g. --field question=problem")
        else:
            canon, column = spec
        if canon not in FIELDS:
            raise UserError(f"--field {canon}={column}: {canon!r} is not a field this reads; the fields are "
                            f"{', '.join(FIELDS)}")
        if canon in out and out[canon] != column:
            raise UserError(f"--field {canon} is given twice ({out[canon]!r} and {column!r}); pass it once")
        out[canon] = column
    return tuple(sorted((k, v) for k, v in out.items() if k != v))


def _is_local(dataset: str) -> bool:
    p = Path(dataset).expanduser()
    return p.exists() or dataset.endswith(LOCAL_SUFFIXES) or dataset.startswith(("/", ".", "~"))


def _data_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))


def folder_files(folder: Path, split: str) -> list[Path]:
    """The files of ``split`` in a dataset folder, read in this order and concatenated:
    1. ``<split>.jsonl`` or ``<split>.parquet``, when there is one (jsonl first);
    2. else the shards ``<split>-*`` / ``<split>_*`` (.jsonl/.parquet) in the folder or its ``data/``
       subfolder (a Hub dataset's layout, e.g. ``data/train-00000-of-00002.parquet``), sorted by name;
    3. else every .jsonl/.parquet file in the folder and ``data/``, sorted by name, provided none is named
       after a split (train, test, validation, valid, val, dev, eval): a folder of other splits is refused
       rather than read whole."""
    for suffix in LOCAL_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return [folder / f"{split}{suffix}"]
    files = _data_files(folder) + _data_files(folder / "data")
    shards = [p for p in files if re.match(rf"{re.escape(split)}[-_]", p.name)]
    if shards:
        return shards
    splits = [p for p in files if re.match(rf"({'|'.join(SPLIT_NAMES)})([-_.])", p.name)]
    if splits:
        names = ", ".join(p.name for p in splits[:4]) + (", ..." if len(splits) > 4 else "")
        raise UserError(f"folder {folder} has no {split} split ({split}.jsonl, {split}.parquet or "
                        f"{split}-* shards) but holds {names}; pass the split with --split, or a file as "
                        "--dataset")
    if not files:
        raise UserError(f"folder {folder} holds no .jsonl or .parquet files; pass a data file or a folder of "
                        "them as --dataset")
    return files


def _local_files(dataset: str, split: str) -> list[Path]:
    p = Path(dataset).expanduser()
    if p.is_dir():
        return folder_files(p, split)
    if not p.exists():
        raise UserError(f"dataset file {p} does not exist; pass an existing .jsonl/.parquet file, a folder "
                        "of them or a Hub id")
    if p.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"dataset file {p} is neither .jsonl nor .parquet; convert it or pass a Hub id")
    return [p]


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) per non-blank line; ``where`` is "FILE: row N" with N the 1-based line number."""
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
                raise UserError(f"{path}:{lineno}: expected a JSON object (one row per line), got "
                                f"{type(obj).__name__}; fix or remove line {lineno}")
            rows.append((f"{path}: row {lineno}", obj))
    return rows


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"cannot read parquet file {path} ({e}); check the file") from None
    return [(f"{path}: row {i + 1}", r) for i, r in enumerate(rows)]


def hub_config(dataset: str, config_name: str | None) -> str | None:
    """The Hub dataset config to load: the one given, else 'main' for GSM8K, else the dataset's default."""
    if config_name is None and dataset in GSM8K_HUB_IDS:
        return "main"
    return config_name


def _read_hub(dataset: str, config_name: str | None, split: str) -> list[tuple[str, dict[str, Any]]]:
    hub_local_only(dataset, flag="--dataset", what="dataset", filename="README.md", repo_type="dataset")
    import datasets

    if not sys.stderr.isatty():  # its bars redraw with carriage returns: one huge line in a log file
        datasets.disable_progress_bars()

    config_name = hub_config(dataset, config_name)
    try:
        ds = datasets.load_dataset(dataset, config_name, split=split)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"could not load dataset {dataset!r} (config {config_name!r}, split {split!r}) from the "
            f"Hugging Face Hub ({reason}); if the Hub is unreachable, pass a local path instead, e.g. "
            f"--dataset path/to/{split}.jsonl"
        ) from None
    return [(f"{dataset}[{split}]: row {i + 1}", dict(r)) for i, r in enumerate(ds)]


def read_rows(dataset: str, split: str = "train", config_name: str | None = None,
              limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The raw rows of a file, a folder (``folder_files``) or a Hub id, each with where it came from."""
    if _is_local(dataset):
        files = _local_files(dataset, split)
        raw = [r for f in files for r in (_read_jsonl(f) if f.suffix == ".jsonl" else _read_parquet(f))]
        where = str(files[0]) if len(files) == 1 else f"{dataset} ({len(files)} files)"
    else:
        raw = _read_hub(dataset, config_name, split)
        where = f"{dataset}[{split}]"
    if limit is not None:
        raw = raw[:limit]
    if not raw:
        raise UserError(f"dataset {where} has no rows; check the path and split")
    return raw


class _Row:
    """Reads one raw row through the ``--field`` mapping; errors name the row and the column."""

    def __init__(self, where: str, obj: dict[str, Any], mapping: dict[str, str]):
        self.where, self.obj, self.mapping = where, obj, mapping

    def name(self, canon: str) -> str:
        col = self.mapping.get(canon, canon)
        return f"the {col!r} field" + (f" (--field {canon}={col})" if col != canon else "")

    def get(self, canon: str) -> Any:
        return self.obj.get(self.mapping.get(canon, canon))

    def fail(self, what: str, fix: str = "fix or remove that row") -> UserError:
        return UserError(f"{self.where}: {what}; {fix}")

    def formats(self) -> list[str]:
        """The row formats whose marking field this row has."""
        return [f for f in ROW_FORMATS if self.get(FORMAT_KEY[f]) is not None]

    def text(self, canon: str, optional: bool = False, hint: str = "") -> str | None:
        value = self.get(canon)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            state = ("missing" if value is None else "empty" if isinstance(value, str) else
                     f"not a string (a {type(value).__name__})")
            raise self.fail(f"{self.name(canon)} is {state}{hint}")
        return value

    def turns(self, canon: str, supervise: bool) -> tuple[Turn, ...]:
        """A list of {role, content} turns; with ``supervise`` the assistant turns are supervised."""
        value = self.get(canon)
        what = self.name(canon)
        if not isinstance(value, list) or not value:
            state = "missing" if value is None else "an empty list" if isinstance(value, list) else \
                f"a {type(value).__name__}"
            raise self.fail(f"{what} is {state}, not a list of {{role, content}} turns")
        role_key, content_key = self.mapping.get("role", "role"), self.mapping.get("content", "content")
        out = []
        for j, m in enumerate(value, start=1):
            if not isinstance(m, dict) or m.get(role_key) is None:
                raise self.fail(f"turn {j} of {what} is not an object with {role_key!r} and {content_key!r} "
                                "keys", "give every turn a role and a content (or map yours with --field "
                                "role=NAME --field content=NAME)")
            role, content = m[role_key], m.get(content_key)
            role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
            if role not in ROLES:
                raise self.fail(f"turn {j} of {what} has role {role!r}", f"roles must be one of "
                                f"{', '.join(ROLES)} (or ShareGPT's human, gpt): rename it or drop the turn")
            if not isinstance(content, str):
                state = "missing" if content is None else f"a {type(content).__name__}, not a string"
                raise self.fail(f"the content of turn {j} ({role}) of {what} is {state}",
                                "give each turn's text as one string (content parts, images and tool calls "
                                "are not read)")
            sup = supervise and role == "assistant"
            if sup and not content.strip():
                raise self.fail(f"turn {j} (assistant) of {what} is empty")
            out.append(Turn(role, content, sup))
        return tuple(out)


def _last_user(turns: tuple[Turn, ...]) -> str:
    return next((t.content for t in reversed(turns) if t.role == "user"), "")


def _parse_row(i: int, r: _Row, fmt: str, require_answer: bool) -> Example:
    if fmt == "qa":
        hint = (" (a question-only file needs teacher-cache --write N: the teacher writes the answers)"
                if require_answer and r.get("answer") is None else "")
        question = r.text("question")
        answer = r.text("answer", optional=not require_answer, hint=hint)
        return Example(row=i, question=question, answer=answer, written_by=r.text("written_by", True),
                       reference=r.text("reference", True), where=r.where)
    if fmt == "messages":
        turns = r.turns("messages", supervise=True)
        sup = [j for j, t in enumerate(turns) if t.supervised]
        if not sup:
            raise r.fail(f"{r.name('messages')} has no assistant turn, so nothing would be learned from it",
                         "add the assistant's reply or remove that row")
        if sup[0] == 0:
            raise r.fail(f"{r.name('messages')} starts with an assistant turn",
                         "put the user (or system) turn it answers before it, or remove that row")
        turns = turns[: sup[-1] + 1]  # turns after the last reply teach nothing
        return Example(row=i, question=_last_user(turns[: sup[-1]]), answer=turns[-1].content, turns=turns,
                       kind=fmt, where=r.where)
    prompt_value = r.get("prompt")
    if isinstance(prompt_value, str):
        prompt = (Turn("user", r.text("prompt")),)
    elif isinstance(prompt_value, list):
        prompt = r.turns("prompt", supervise=False)
    else:
        state = "missing" if prompt_value is None else f"a {type(prompt_value).__name__}"
        raise r.fail(f"{r.name('prompt')} is {state}, not a string or a list of {{role, content}} turns")
    completion_value = r.get("completion")
    if isinstance(completion_value, list):
        completion = r.turns("completion", supervise=True)
        bad = next((j for j, t in enumerate(completion, 1) if t.role != "assistant"), None)
        if bad is not None:
            raise r.fail(f"turn {bad} of {r.name('completion')} has role {completion[bad - 1].role!r}",
                         "a completion holds assistant turns only: move the others into the prompt")
    else:
        hint = (" (a prompt-only file needs teacher-cache --write N: the teacher writes the completions)"
                if require_answer and completion_value is None else "")
        text = r.text("completion", optional=not require_answer, hint=hint)
        completion = () if text is None else (Turn("assistant", text, True),)
    turns = prompt + completion
    return Example(row=i, question=_last_user(prompt), answer=completion[-1].content if completion else None,
                   written_by=r.text("written_by", True), reference=r.text("reference", True),
                   turns=turns, kind=fmt, where=r.where)


def detect_format(r: _Row, fields: tuple[tuple[str, str], ...]) -> str:
    """The row format of a dataset's first row (``--data-format auto``)."""
    found = r.formats()
    if len(found) == 1:
        return found[0]
    if found:
        keys = " and ".join(r.name(FORMAT_KEY[f]) for f in found)
        raise r.fail(f"the row has {keys}, so its format is ambiguous",
                     f"pick one with --data-format {' or --data-format '.join(found)}")
    have = ", ".join(map(repr, list(r.obj)[:8])) or "none"
    mapped = " (after --field)" if fields else ""
    raise r.fail(f"no 'question', 'messages' or 'prompt' field{mapped} (its fields: {have})",
                 "name yours with --field question=NAME (or messages=NAME, prompt=NAME; see "
                 "docs/teacher-cache.md)")


def load_examples(dataset: str, split: str = "train", *, config_name: str | None = None,
                  limit: int | None = None, require_answer: bool = True, data_format: str = "auto",
                  fields: Any = ()) -> list[Example]:
    """Read the rows (the first ``limit`` if given) as ``Example`` s of one row format (``data_format``, or
    detected from the first row), through the ``fields`` mapping (``--field CANON=COLUMN``). With
    ``require_answer=False`` a qa row's ``answer`` and a prompt-completion row's ``completion`` may be absent
    (None); messages rows always carry their replies, so they cannot be written (refused). Errors name the
    file and 1-based row (in a .jsonl file, its line)."""
    check_data_format(data_format)
    fields = parse_fields(fields)
    mapping = dict(fields)
    raw = read_rows(dataset, split, config_name, limit)
    first = _Row(*raw[0], mapping)
    fmt = detect_format(first, fields) if data_format == "auto" else data_format
    unused = [f"--field {c}={v}" for c, v in fields if fmt not in FIELDS[c]]
    if unused:
        raise UserError(f"{' '.join(unused)} does not apply to {fmt} rows; drop it (or pass --data-format)")
    if fmt == "messages" and not require_answer:
        raise UserError(f"{first.where}: --write needs question or prompt rows, but the dataset has messages "
                        "rows (their replies are given); cache them without --write, or give prompt rows "
                        "(the conversation before the reply) for the teacher to answer")
    examples = []
    for i, (where, obj) in enumerate(raw):
        r = _Row(where, obj, mapping)
        if r.get(FORMAT_KEY[fmt]) is None:
            other = [f for f in r.formats() if f != fmt]
            if other:
                why = f"{first.where} is a {fmt} row" if data_format == "auto" else f"--data-format is {fmt}"
                raise r.fail(f"a {other[0]} row ({r.name(FORMAT_KEY[other[0]])}), but {why}",
                             "one dataset holds one row format: convert or split the file")
        examples.append(_parse_row(i, r, fmt, require_answer))
    return examples


def dataset_hash(examples: list[Example]) -> str:
    """Hash of the rows' text; rows written by someone else also hash who wrote them and the reference;
    chat rows hash their format and turns (qa rows keep the hash they always had)."""
    def key(e: Example) -> list[Any]:
        body: list[Any] = [e.question, e.answer] if e.turns is None else \
            [e.kind, [[t.role, t.content, t.supervised] for t in e.turns]]
        return body + ([e.written_by, e.reference] if e.written_by or e.reference else [])

    return json_hash([key(e) for e in examples])


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
