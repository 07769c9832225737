"""``fnet-distill teacher-cache``: stage one as a command (works under ``torchrun`` too)."""

from __future__ import annotations

from pathlib import Path

import typer

from cache.util import UserError
from pipeline.commands.choices import (
    ComputeDtype,
    DataFormat,
    Encoding,
    Keep,
    LogprobDtype,
    Overflow,
    ShardFormat,
    value,
)
from pipeline.config_file import CONFIG_HELP, merge_config, write_run_config


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        temps = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UserError(f"--temperatures must be comma-separated numbers like 1,2; got {text!r}") from None
    if not temps:
        raise UserError("--temperatures is empty; pass e.g. --temperatures 1,2")
    return temps


def teacher_cache(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    teacher: str = typer.Option(None, help="Required (here or in --config). Teacher causal LM: a Hub id "
                                "(e.g. Qwen/Qwen2-0.5B-Instruct) or a "
                                "local folder made by save_pretrained."),
    dataset: str = typer.Option("openai/gsm8k", help="Rows to cache: a Hub id, a local .jsonl/.parquet "
                                "file, or a folder (its <split>.jsonl/.parquet, else its <split>-* shards, "
                                "also under data/, else all its .jsonl/.parquet files). Rows are qa "
                                "(question/answer; answer optional with --write; optional written_by and "
                                "reference fields mark answers written by another model), messages or "
                                "prompt/completion: see --data-format and --field (docs/teacher-cache.md)."),
    split: str = typer.Option("train", help="Dataset split (Hub) or file stem looked up in a local folder."),
    data_format: DataFormat = typer.Option("auto", "--data-format", help="Row format: auto (from the first "
                                           "row: a 'messages' field means messages, 'prompt' "
                                           "prompt-completion, 'question' qa), qa (question + answer, "
                                           "GSM8K's), messages (a chat of system/user/assistant turns; "
                                           "every assistant turn is learned, nothing else) or "
                                           "prompt-completion (prompt: a string or a list of turns; "
                                           "completion: the learned reply). All rows must have the same "
                                           "format. (The shard format is --format.)"),
    field: list[str] = typer.Option(None, "--field", metavar="CANON=COLUMN", help="Repeatable: read the "
                                    "canonical field CANON from your column COLUMN, e.g. --field "
                                    "question=problem --field answer=solution, or --field "
                                    "messages=conversations --field role=from --field content=value. CANON: "
                                    "question, answer, written_by, "
                                    "reference, messages, prompt, completion, role, content (role/content: "
                                    "the keys inside each turn). Recorded in the cache's fingerprint."),
    dataset_config: str = typer.Option(None, "--dataset-config", help="Hub dataset config (subset); default: "
                                       "'main' for openai/gsm8k, else the dataset's default."),
    out: Path = typer.Option(None, help="Required (here or in --config). Output cache folder. Rerunning the "
                             "same command resumes it; a folder made with other settings is refused. A "
                             "finished cache holds config.yaml, the settings of its latest run."),
    tokenizer: str = typer.Option(None, help="Tokenizer (Hub id or folder); default: the teacher's own."),
    topk: int = typer.Option(64, help="Teacher ids kept per supervised position (1..vocab size)."),
    samples: int = typer.Option(0, help="Also draw this many ids per position from the teacher at T=1 "
                                "(stored as unique ids + counts); 0 disables."),
    temperatures: str = typer.Option("1,2", help="Comma-separated temperatures for which the top-k shift "
                                     "and exact tail mass are stored."),
    max_length: int = typer.Option(512, help="Maximum tokens per chat-formatted sequence."),
    overflow: Overflow = typer.Option("drop", help="Rows longer than --max-length: 'drop' them, or "
                                      "'truncate' the answer (keeps the prompt; a truncated row has no "
                                      "closing eos)."),
    batch_tokens: int = typer.Option(16384, help="Padded tokens per teacher batch (sequences are "
                                                 "length-sorted). Not in the fingerprint, so a resume may "
                                                 "use another; it changes only float rounding: the teacher's"
                                                 " sums depend on the batch shape, so a few stored log-probs"
                                                 " can move by one fp16 step, shifts and tails by ~1e-6, and"
                                                 " a top-k or sampled id can change where two candidates tie"
                                                 " within rounding; masks and units never change. The same "
                                                 "value, device and dtype give a bit-identical cache."),
    limit: int = typer.Option(None, help="Use only the first N rows of the split."),
    device: str = typer.Option("auto", help="auto (CUDA if available, per LOCAL_RANK under torchrun), cpu, "
                               "cuda or cuda:N."),
    dtype: ComputeDtype = typer.Option("auto", help="Teacher compute dtype: auto (bfloat16 on CUDA, float32 "
                                       "on CPU), float32, bfloat16 or float16."),
    logprob_dtype: LogprobDtype = typer.Option("float16", help="With --encoding exact: stored dtype of the "
                                               "top-k log-probs (shifts and tail masses are always "
                                               "float32). Ignored by the compact encoding, which decodes to "
                                               "float32."),
    format: ShardFormat = typer.Option("arrow", "--format", help="Shard format (docs/cache-format.md)."),
    encoding: Encoding = typer.Option("compact", help="Record encoding: compact (ids through a per-sequence "
                                 "frequency dictionary, bit-packed or Rice-coded; log-probs quantised in "
                                 "--lp-step nats below each row's top, 16-bit tail codes; ~5x smaller than "
                                 "exact at top-64, KL to the exact rows <= (lp-step + 0.002)^2 / 8 per row, "
                                 "recorded in the manifest) or exact (int32 ids, --logprob-dtype log-probs, "
                                 "float32 shift and tail)."),
    top_p: float = typer.Option(None, "--top-p", help="Compact only: adaptive k. Per position keep the "
                                "fewest ids whose T=1 mass reaches this value (at most --topk); the "
                                "dropped ids' exact mass goes into the stored tail at every temperature. "
                                "The measured preset is --top-p 0.9 --topk 32."),
    lp_step: float = typer.Option(1.0 / 16, help="Compact only: log-prob quantisation step in nats (0.0625 "
                                  "keeps KL <= 5e-4 per row; larger is smaller and coarser)."),
    unit_size: int = typer.Option(256, help="Sequences per unit (a shard, the resume granularity and the "
                                  "work item assigned round-robin to torchrun ranks)."),
    seed: int = typer.Option(0, help="Seed of the per-(sequence, position) sampling streams."),
    progress: bool = typer.Option(True, help="Progress on stderr (rank 0): a bar on a terminal, else a line "
                                  "every 30 s (FNET_PROGRESS_SECONDS); the summary is printed either way."),
    write: int = typer.Option(0, "--write", help="Have the teacher write this many solutions per question "
                              "(its own chat template, batched sampling on its KV cache) and cache the kept "
                              "ones instead of the given answers; rows need only a question. Each (--seed, "
                              "question, sample) has its own random stream, so the text does not depend on "
                              "batching, ranks or resume. 0: cache the dataset's answers (the default)."),
    write_temperature: float = typer.Option(0.7, help="With --write: sampling temperature (0: greedy, only "
                                            "with --write 1)."),
    write_top_p: float = typer.Option(0.95, help="With --write: nucleus sampling, the fewest most likely "
                                      "tokens whose mass reaches this share (1: the whole distribution)."),
    write_max_tokens: int = typer.Option(256, help="With --write: most new tokens per solution; a solution "
                                         "that has not ended by then is never kept."),
    keep: Keep = typer.Option("auto", help="With --write, which solutions are cached: reference (final "
                             "'#### N' equals the row's reference answer; every row needs one), majority "
                             "(agrees with the unique most frequent answer of the question's samples, "
                             "reference answers unused), auto (reference where the row has one, else "
                             "majority) or all (every solution that ended). Exact duplicates of a question's "
                             "earlier sample are dropped."),
    min_vote: float = typer.Option(0.5, help="With --keep majority/auto: the least share of the question's "
                                   "samples the majority answer needs (0.5 with --write 4: at least 2 of "
                                   "4)."),
    write_batch: int = typer.Option(1024, help="With --write: sequences sampled together (questions x "
                                    "--write). Not in the fingerprint; memory grows with it and the length."),
) -> None:
    """Run the teacher once over chat-formatted rows (GSM8K by default) and write its sparse next-token
    distributions (top-k log-probs, tail mass, optional samples) to a sharded, fingerprinted, resumable cache.

    The cached answers are the dataset's (reference answers, or answers someone else wrote: rows with a
    'written_by' field, such as `fnet-distill eval --answers-out`), or with --write N solutions the teacher
    writes itself, kept by --keep."""
    options = merge_config(ctx, teacher_cache, {k: v for k, v in locals().items() if k != "ctx"}, config,
                           required=("teacher", "out"))
    from transformers.utils import logging as hf_logging

    from pipeline.teacher_cache import TeacherCacheConfig, format_summary, run_teacher_cache

    hf_logging.disable_progress_bar()
    # every other option is the TeacherCacheConfig field of its name (tests/test_settings.py holds them equal)
    same = {k: value(v) for k, v in options.items() if k not in ("config", "field", "temperatures")}
    cfg = TeacherCacheConfig(**same, fields=tuple(options["field"] or ()),
                             temperatures=parse_temperatures(options["temperatures"]))
    summary = run_teacher_cache(cfg)
    if summary["rank"] == 0:
        # beside the manifest, outside it: the fingerprint and `cache verify` never read it
        write_run_config(cfg.out, "teacher-cache", options)
        typer.echo(format_summary(summary))


def register(app: typer.Typer) -> None:
    app.command("teacher-cache")(teacher_cache)

