"""``fnet-distill cut-student``: a smaller model of the teacher's architecture initialised from its weights
(``student.cut``), a starting point for ``train-student --init-from``."""

from __future__ import annotations

from pathlib import Path

import typer

from cache.util import UserError


def cut_student_command(
    teacher: str = typer.Option(..., help="Teacher model: a local folder made by save_pretrained or a "
                                "Hugging Face Hub id (read from the local cache when the Hub is "
                                "unreachable)."),
    layers: str = typer.Option(..., help="Comma-separated teacher layers to keep, increasing, 0-based (e.g. "
                               "0,2,4 or 0-3,23): copied exactly, with the teacher's embeddings, final norm "
                               "and head."),
    out: Path = typer.Option(..., help="New folder for the cut model (config, weights, the teacher's "
                             "tokenizer, cut.json, README.md)."),
    ffn: int = typer.Option(None, help="Narrow each kept layer's FFN to this many inner channels, those with "
                            "the largest gate * up * down weight norms (gate/up/down MLPs: Qwen2, Llama). "
                            "Default: the teacher's width."),
    heads: int = typer.Option(None, help="Keep this many query heads per layer: whole key/value groups (a "
                              "multiple of the teacher's query heads per key/value head), those whose output "
                              "projection columns have the largest norm (q/k/v/o attention: Qwen2, Llama). "
                              "Default: all."),
) -> None:
    """Cut a student from the teacher: a subset of its layers (optionally narrower FFNs, fewer heads).

    The folder records the kept layers and the parameter counts (cut.json) and loads with plain
    AutoModelForCausalLM.from_pretrained; train it with train-student --init-from OUT.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from pipeline.hub import hub_local_only
    from pipeline.teacher import looks_local
    from student.cut import cut_model, parameter_count, write_cut

    hf_logging.disable_progress_bar()
    kept = parse_layers(layers)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} already exists and is not an empty folder; choose a new folder")
    local_only = False if looks_local(teacher) else hub_local_only(teacher, flag="--teacher", what="teacher")
    try:
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32,
                                                     local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise UserError(f"--teacher {teacher} does not load as a causal LM ({str(e).splitlines()[0][:200]}); "
                        "pass a folder made by save_pretrained or a Hub id") from None
    tokenizer = None  # a teacher folder without a tokenizer: the cut one has none either
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if not looks_local(teacher) or any((Path(teacher) / f).is_file() for f in tok_files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(teacher, local_files_only=local_only)
        except (OSError, ValueError, TypeError):
            pass
    student, record = cut_model(model, kept, ffn, heads)
    write_cut(student, record, out, teacher_name=teacher, teacher_layers=model.config.num_hidden_layers,
              teacher_parameters=parameter_count(model), tokenizer=tokenizer)
    typer.echo(f"cut {len(kept)} of {model.config.num_hidden_layers} layers ({parameter_count(student):,} "
               f"of {parameter_count(model):,} parameters) into {out}; train it with: fnet-distill "
               f"train-student --init-from {out} --cache CACHE --out RUN")


def parse_layers(text: str) -> list[int]:
    """``0,2,4`` or ``0-3,23`` -> [0, 2, 4] / [0, 1, 2, 3, 23]; one line when malformed."""
    out: list[int] = []
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    except ValueError:
        raise UserError(f"--layers {text!r} is not a list of layer numbers like 0,2,4 or 0-3,23") from None
    return out


def register(app: typer.Typer) -> None:
    app.command("cut-student")(cut_student_command)
