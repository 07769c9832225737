"""Dataset rows -> ``Example``s: reading a Hub id, a local ``.jsonl`` / ``.parquet`` file or a folder
(``folder_files`` says which of its files make a split), the three row formats (``ROW_FORMATS``, detected from
the first row or named with ``--data-format``): ``qa`` (GSM8K's question/answer, optional
written_by/reference), ``messages`` (a chat: system/user/assistant turns, every assistant turn supervised) and
``prompt-completion`` (a prompt string or list of turns, and the completion the model learns), and
``--field CANON=COLUMN`` mapping. ``pipeline.data`` turns the examples into tokens."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cache.util import UserError, json_hash
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


