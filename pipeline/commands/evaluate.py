"""``fnet-distill eval``: greedy GSM8K accuracy of a student or any causal LM (``pipeline.evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.commands.choices import ComputeDtype, DataFormat, value
from pipeline.evaluate import evaluate_model, format_summary


def eval_command(
    model: str = typer.Option(..., help="Student checkpoint folder or any causal LM (save_pretrained folder "
                              "or Hub id); the type is read from config.json."),
    dataset: str = typer.Option("openai/gsm8k", help="Rows to score: a Hub id, a local .jsonl/.parquet file "
                                "or a folder (read as teacher-cache reads it). Rows whose answer (or final "
                                "assistant turn) ends with a GSM8K-style '#### N' are scored; data without "
                                "any is refused in one line (measure it by validation CE/KL instead)."),
    split: str = typer.Option("test", help="Dataset split (Hub) or file stem looked up in a local folder."),
    data_format: DataFormat = typer.Option("auto", "--data-format", help="Row format: auto, qa, messages or "
                                           "prompt-completion (as teacher-cache --data-format); the prompt "
                                           "is everything before the final assistant turn."),
    field: list[str] = typer.Option(None, "--field", metavar="CANON=COLUMN", help="Repeatable: read a "
                                    "canonical field from another column (as teacher-cache --field), e.g. "
                                    "--field question=problem --field answer=solution."),
    dataset_config: str = typer.Option(None, "--dataset-config", help="Hub dataset config (subset); default: "
                                       "'main' for openai/gsm8k, else the dataset's default."),
    limit: int = typer.Option(None, help="Evaluate only the first N rows."),
    max_new_tokens: int = typer.Option(256, help="Generation budget per example."),
    batch_size: int = typer.Option(16, help="Prompts per generation batch (left-padded, length-sorted)."),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu, cuda or cuda:N."),
    dtype: ComputeDtype = typer.Option("auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                       "bfloat16 or float16."),
    tokenizer: str = typer.Option(None, help="Tokenizer folder or Hub id; default: the model folder's own."),
    out: Path = typer.Option(None, help="Write per-example records (question, reference, output, extracted "
                             "answers, verdicts) to this JSONL file."),
    answers_out: Path = typer.Option(None, help="Also write the model's answers as input for stage one "
                                     "(question, answer = the model's output, written_by = --model, "
                                     "reference): `teacher-cache --dataset FILE` has the teacher score them "
                                     "(offline on-policy distillation; docs/teacher-cache.md)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as one JSON object instead."),
    progress: bool = typer.Option(True, help="Progress on stderr: a bar on a terminal, else a line every "
                                  "30 s (FNET_PROGRESS_SECONDS); the summary is printed either way."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check a student folder's files against "
                                "its manifest.json first (when it has one); --no-verify reads a folder "
                                "edited on purpose."),
) -> None:
    """Greedy GSM8K accuracy (strict '#### N' and flexible last-number match) of a student or a teacher."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import tempfile

    from pipeline.evaluate import write_answers

    with tempfile.TemporaryDirectory(prefix="fnet-eval-") as tmp:
        records = out if out is not None or answers_out is None else Path(tmp) / "eval.jsonl"
        result = evaluate_model(model, dataset, split, limit, max_new_tokens=max_new_tokens,
                                batch_size=batch_size, device=device, dtype=value(dtype), tokenizer=tokenizer,
                                out=records, progress=progress, verify=verify, config_name=dataset_config,
                                data_format=value(data_format), fields=tuple(field or ()))
        n_answers = None
        if answers_out is not None:
            n_answers = write_answers(records, answers_out, written_by=str(model))
    if out is None:
        import dataclasses

        result = dataclasses.replace(result, outputs_path=None)
    typer.echo(json.dumps(result.to_json()) if json_out else format_summary(result, model, split))
    if n_answers is not None and not json_out:
        typer.echo(f"  answers for teacher-cache: {answers_out} ({n_answers} rows)")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
