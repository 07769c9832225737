"""``fnet-distill eval``: greedy GSM8K accuracy of a student checkpoint or of any Hugging Face causal LM.

The prompt is the one the teacher cache trains on: the tokenizer's chat template with its default system
prompt, the user question and the assistant generation prompt. Decoding is greedy and stops at the first
stop token (``<|im_end|>``, the tokenizer's eos and the model's own generation eos ids). The model type comes
from ``config.json``: ``causal_stft_fnet`` runs the student's batched incremental decoder
(``generate_fast``), anything else runs ``AutoModelForCausalLM`` + ``generate`` with left padding. Scoring is
``pipeline.answers`` (strict ``#### N`` and flexible last-number match); per-example records go to a JSONL
file written atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from cache.util import UserError, atomic_write_bytes
from pipeline.answers import extract_reference, score_output
from pipeline.data import load_tokenizer
from pipeline.hub import hub_local_only
from pipeline.prompts import example_prompt_ids, stop_token_ids
from pipeline.rows import check_data_format, load_examples, parse_fields

STUDENT_MODEL_TYPE = "causal_stft_fnet"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

# prompts (token id lists) -> new token ids per prompt (anything after a stop token is ignored)
GenerateFn = Callable[[list[list[int]]], list[list[int]]]


@dataclass(frozen=True)
class EvalConfig:
    model: str
    dataset: str = "openai/gsm8k"
    split: str = "test"
    config_name: str | None = None  # Hub config; None: 'main' for GSM8K, else the dataset's default
    limit: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    tokenizer: str | None = None
    out: Path | None = None
    progress: bool = True
    verify: bool = True  # a local student folder's files against its manifest.json, when it has one
    data_format: str = "auto"  # row format (pipeline.data.DATA_FORMATS)
    fields: tuple[tuple[str, str], ...] = ()  # --field CANON=COLUMN mapping

    def __post_init__(self) -> None:
        check_data_format(self.data_format)
        object.__setattr__(self, "fields", parse_fields(self.fields))
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit must be a positive number of rows, got {self.limit}")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.out is not None and Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a folder; pass a file name such as {self.out}/eval.jsonl")


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and speed of one evaluation. ``wall_s`` covers prompt formatting, generation and scoring
    (not model loading); ``tokens_per_s`` counts generated tokens, the stop token included."""

    n: int
    strict_acc: float
    flexible_acc: float
    tokens_per_s: float
    wall_s: float
    outputs_path: Path | None
    strict_correct: int
    flexible_correct: int
    new_tokens: int
    model_kind: str

    @property
    def examples_per_s(self) -> float:
        return self.n / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs_path"] = None if self.outputs_path is None else str(self.outputs_path)
        d["examples_per_s"] = self.examples_per_s
        return d


# ------------------------------------------------------------------------------------ model and tokenizer


def not_a_model_folder(folder: Path) -> str:
    """Why ``folder`` (without a config.json) is not a model folder, and what to pass instead."""
    if (folder / "final" / "config.json").is_file():
        return (f"{folder} is a training run folder, not a model; pass its model folder, "
                f"--model {folder / 'final'}")
    if (folder / "manifest.json").is_file() or any(folder.glob("journal.rank*.jsonl")):
        return (f"{folder} is a teacher cache, not a model; pass a student folder (train-student's "
                "OUT/final) or a causal LM folder made by save_pretrained")
    return (f"{folder} is not a model folder (no config.json); pass a folder made by save_pretrained (for a "
            "student, train-student's OUT/final)")


def model_type(model: str) -> str:
    """``model_type`` from the config of a local folder or a Hub id."""
    from pipeline.teacher import looks_local

    if looks_local(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise UserError(f"model folder {folder} does not exist; pass a student checkpoint or a causal LM "
                            "folder made by save_pretrained")
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise UserError(not_a_model_folder(folder))
        try:
            cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_path} is not valid JSON, so not a valid model config ({e}); re-save the "
                            "model") from None
        kind = cfg.get("model_type") if isinstance(cfg, dict) else None
        if not isinstance(kind, str):
            raise UserError(f"{cfg_path} has no model_type; re-save the model with save_pretrained")
        return kind
    from transformers import AutoConfig

    local_only = hub_local_only(model, flag="--model", what="model")
    try:
        return AutoConfig.from_pretrained(model, local_files_only=local_only).model_type
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the config of {model!r} from the Hugging Face Hub "
                        f"({str(e).splitlines()[0]}); if the Hub is unreachable, pass a local model folder "
                        "with --model") from None


def load_eval_tokenizer(model: str, tokenizer: str | None = None, *,
                        instead: str = "pass the tokenizer the model was trained with, e.g. --tokenizer "
                                       "path/to/tokenizer") -> Any:
    """The tokenizer given with ``--tokenizer``, else the model's own (a local folder must contain one;
    ``instead`` says what to do when it does not)."""
    import student.modeling  # noqa: F401  registers causal_stft_fnet, whose config AutoTokenizer reads
    from pipeline.teacher import looks_local

    if tokenizer is None:
        if looks_local(model) and not any((Path(model).expanduser() / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"no usable tokenizer in model folder {model} (no "
                            f"{' or '.join(TOKENIZER_FILES)}); {instead}")
        return load_tokenizer(str(model), "--model")
    return load_tokenizer(str(tokenizer))


def verify_student_folder(model: str, kind_name: str) -> None:
    """A local model folder's files against its manifest.json, when it has one (train-student writes one for
    the FNet and for transformers students; ``--no-verify`` skips this); other folders and Hub ids are
    loaded as they are."""
    from pipeline.teacher import looks_local

    if looks_local(model):
        from student.checkpoint import check_folder_manifest

        check_folder_manifest(Path(model).expanduser(), "--model")


def load_eval_model(model: str, *, device: str = "auto", dtype: str = "auto",
                    verify: bool = True) -> tuple[Any, str]:
    """(model in eval mode on ``device``, kind): kind is "student" for ``causal_stft_fnet``, else "hf". With
    ``verify``, a local student folder's files are checked against its manifest.json first."""
    from cache.device import resolve_device
    from pipeline.teacher import looks_local, resolve_dtype

    kind_name = model_type(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if verify:
        verify_student_folder(model, kind_name)
    if kind_name == STUDENT_MODEL_TYPE:
        from student.modeling import CausalFNetForCausalLM as cls

        kind = "student"
    else:
        from transformers import AutoModelForCausalLM as cls

        kind = "hf"
    local_only = not looks_local(model) and hub_local_only(model, flag="--model", what="model")
    try:
        loaded = cls.from_pretrained(str(model), dtype=torch_dtype, local_files_only=local_only)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"could not load a causal LM (model_type {kind_name!r}) from {model} "
                        f"({str(e).splitlines()[0]}); pass a student checkpoint or a causal LM "
                        "folder") from None
    return loaded.to(dev).eval(), kind


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any = "cpu") -> tuple[Any, Any]:
    """Token id lists -> input_ids (B, T) left-padded with ``pad_id`` and attention_mask (B, T)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def position_limit(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def make_generate_fn(model: Any, kind: str, *, stop_ids: Sequence[int], pad_id: int,
                     max_new_tokens: int) -> GenerateFn:
    """Batched greedy generation: the student's incremental decoder, or HF ``generate`` for any other LM.
    Prompts are left-padded; each returned row holds the new tokens only."""
    import torch

    device = next(model.parameters()).device
    if kind == "hf":
        from transformers import GenerationConfig

        # A fresh config: the checkpoint's own sampling / repetition-penalty defaults must not leak in.
        model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                                                   eos_token_id=list(stop_ids), pad_token_id=pad_id)

    @torch.inference_mode()
    def generate(prompts: list[list[int]]) -> list[list[int]]:
        ids, mask = left_pad(prompts, pad_id, device)  # (B, T)
        if kind == "student":
            out = model.generate_fast(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                                      pad_token_id=pad_id)  # (B, T + new)
        else:
            out = model.generate(input_ids=ids, attention_mask=mask)  # (B, T + new)
        return out[:, ids.shape[1]:].tolist()

    return generate


# -------------------------------------------------------------------------------------------- scoring


def cut_at_stop(new_ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[list[int], int, bool]:
    """(tokens before the first stop token, tokens generated including that stop token, whether it
    stopped)."""
    stops = set(stop_ids)
    for i, t in enumerate(new_ids):
        if t in stops:
            return list(new_ids[:i]), i + 1, True
    return list(new_ids), len(new_ids), False


def score_record(row: int, question: str, reference: Decimal | str, output: str, new_tokens: int,
                 stopped: bool) -> dict[str, Any]:
    """One JSONL record: the example, the model output, both extracted answers and both verdicts.
    ``reference`` is the reference number or the raw GSM8K answer field."""
    ref = reference if isinstance(reference, Decimal) else extract_reference(reference)
    s = score_output(output, ref)
    return {
        "row": row, "question": question, "reference": str(ref), "output": output,
        "strict_answer": None if s.strict_answer is None else str(s.strict_answer),
        "flexible_answer": None if s.flexible_answer is None else str(s.flexible_answer),
        "strict_correct": s.strict, "flexible_correct": s.flexible,
        "new_tokens": new_tokens, "stopped": stopped,
    }


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, body.encode("utf-8"))


def write_answers(records_path: Path, out: Path, *, written_by: str) -> int:
    """Turn ``eval`` records into stage-one input rows: the question, the model's output as the answer,
    who wrote it and the reference answer (``teacher-cache`` scores them and records their correctness).
    Returns the number of rows."""
    rows = []
    lines = Path(records_path).read_text(encoding="utf-8").splitlines()
    for line in lines:
        r = json.loads(line)
        if not r["output"].strip():  # an empty answer has nothing for the teacher to score
            continue
        if "prompt" in r:  # a chat row: its conversation is the prompt, the output the completion
            rows.append({"prompt": r["prompt"], "completion": r["output"], "written_by": written_by,
                         "reference": r["reference"]})
        else:
            rows.append({"question": r["question"], "answer": r["output"], "written_by": written_by,
                         "reference": r["reference"]})
    if not rows:
        raise UserError(f"all {len(lines)} outputs of the model are empty; nothing to write to {out}")
    write_records(Path(out), rows)
    return len(rows)


def evaluate_examples(examples: Sequence[Any], tokenizer: Any, generate: GenerateFn, *,
                      stop_ids: Sequence[int], batch_size: int = 16, max_prompt_tokens: int | None = None,
                      out: Path | None = None, progress: bool = True, model_kind: str = "") -> EvalResult:
    """Generate for every example (``pipeline.data.Example``) in length-sorted batches, score, write the
    records (dataset order) to ``out`` if given, and return the totals. ``max_prompt_tokens`` refuses a
    prompt that would run the model past its positions."""
    from cache.progress import Progress  # loads tqdm: not for --help

    if not examples:
        raise UserError("no examples to evaluate; check --dataset, --split and --limit")
    t0 = time.perf_counter()
    check_scorable(examples)
    references = []
    for ex in examples:  # a bad row fails before generation
        try:
            references.append(extract_reference(ex.answer))
        except UserError as e:
            raise UserError(f"{ex.where}: {e}; fix or remove that row" if ex.where else str(e)) from None
    prompts = [example_prompt_ids(tokenizer, ex) for ex in examples]
    if max_prompt_tokens is not None:
        longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
        if len(prompts[longest]) > max_prompt_tokens:
            row = examples[longest].row + 1
            raise UserError(f"row {row} has a {len(prompts[longest])}-token prompt, but "
                            f"with this --max-new-tokens only {max(max_prompt_tokens, 0)} prompt tokens fit "
                            "in the model's positions; lower --max-new-tokens")
    order = sorted(range(len(examples)), key=lambda i: (-len(prompts[i]), i))
    records: list[dict[str, Any] | None] = [None] * len(examples)
    total_new = 0
    bar = Progress(len(examples), desc="eval", unit="ex", enabled=progress)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            new_rows = generate([prompts[i] for i in batch])
            before = total_new
            for i, new_ids in zip(batch, new_rows, strict=True):
                kept, used, stopped = cut_at_stop(new_ids, stop_ids)
                text = tokenizer.decode(kept, skip_special_tokens=True)
                ex = examples[i]
                records[i] = score_record(ex.row, ex.question, references[i], text, used, stopped)
                if ex.turns is not None:  # a chat row: its whole prompt (eval --answers-out keeps it)
                    records[i]["prompt"] = [{"role": t.role, "content": t.content} for t in ex.prompt_turns()]
                total_new += used
            bar.update(len(batch), tokens=total_new - before)
    finally:
        bar.close()
    if out is not None:
        write_records(Path(out), records)
    wall = time.perf_counter() - t0
    n = len(records)
    strict = sum(r["strict_correct"] for r in records)
    flexible = sum(r["flexible_correct"] for r in records)
    return EvalResult(n=n, strict_acc=strict / n, flexible_acc=flexible / n,
                      tokens_per_s=total_new / wall if wall > 0 else 0.0, wall_s=wall,
                      outputs_path=None if out is None else Path(out), strict_correct=strict,
                      flexible_correct=flexible, new_tokens=total_new, model_kind=model_kind)


def check_scorable(examples: Sequence[Any]) -> None:
    """One line when no row has a GSM8K-style reference ('#### N' ending its answer or final reply)."""
    if not any("####" in (ex.answer or "") for ex in examples):
        where = examples[0].where.rsplit(": row ", 1)[0] if examples[0].where else "the dataset"
        raise UserError(f"{where}: none of the {len(examples)} rows has a GSM8K-style reference answer "
                        "('#### N' in its answer or final assistant turn), so eval has nothing to score; "
                        "measure such data by validation CE, KL and agreement instead (cache it with "
                        "teacher-cache and pass it to train-student --val-cache)")


def run_eval(cfg: EvalConfig) -> EvalResult:
    kind_name = model_type(cfg.model)  # a missing, broken or damaged model folder fails before anything slow
    if cfg.verify:
        verify_student_folder(cfg.model, kind_name)
    examples = load_examples(cfg.dataset, cfg.split, config_name=cfg.config_name, limit=cfg.limit,
                             data_format=cfg.data_format, fields=cfg.fields)
    check_scorable(examples)
    tokenizer = load_eval_tokenizer(cfg.model, cfg.tokenizer)
    model, kind = load_eval_model(cfg.model, device=cfg.device, dtype=cfg.dtype, verify=False)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if kind == "hf" else \
        int(model.config.output_vocab_size)
    if len(tokenizer) > vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model reads only {vocab} ids; "
                        "pass the model's own tokenizer with --tokenizer")
    stop_ids = stop_token_ids(tokenizer, model)
    generate = make_generate_fn(model, kind, stop_ids=stop_ids, pad_id=int(tokenizer.pad_token_id),
                                max_new_tokens=cfg.max_new_tokens)
    limit = position_limit(model)
    return evaluate_examples(
        examples, tokenizer, generate, stop_ids=stop_ids, batch_size=cfg.batch_size,
        max_prompt_tokens=None if limit is None else limit - cfg.max_new_tokens + 1,
        out=cfg.out, progress=cfg.progress, model_kind=kind,
    )


def evaluate_model(model_dir: str | Path, dataset: str = "openai/gsm8k", split: str = "test",
                   limit: int | None = None, *, max_new_tokens: int = 256, batch_size: int = 16,
                   device: str = "auto", dtype: str = "auto", tokenizer: str | Path | None = None,
                   out: str | Path | None = None, config_name: str | None = None,
                   progress: bool = True, verify: bool = True, data_format: str = "auto",
                   fields: Any = ()) -> EvalResult:
    """Greedy GSM8K accuracy (strict and flexible) of a student checkpoint or any HF causal LM folder
    (``verify``: a student folder's files are checked against its manifest.json first)."""
    cfg = EvalConfig(model=str(model_dir), dataset=str(dataset), split=split, config_name=config_name,
                     limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                     dtype=dtype, tokenizer=None if tokenizer is None else str(tokenizer),
                     out=None if out is None else Path(out), progress=progress, verify=verify,
                     data_format=data_format, fields=tuple(fields))
    return run_eval(cfg)


def format_summary(result: EvalResult, model: str = "", split: str = "") -> str:
    head = f"GSM8K {split} | {model} ({result.model_kind})" if model else "GSM8K"
    lines = [
        head,
        f"  strict   (#### N)     : {result.strict_acc:7.2%}  ({result.strict_correct}/{result.n})",
        f"  flexible (last number): {result.flexible_acc:7.2%}  ({result.flexible_correct}/{result.n})",
        f"  {result.new_tokens} new tokens in {result.wall_s:.1f} s: {result.tokens_per_s:.1f} tok/s, "
        f"{result.examples_per_s:.2f} examples/s",
    ]
    if result.outputs_path is not None:
        lines.append(f"  outputs: {result.outputs_path}")
    return "\n".join(lines)
