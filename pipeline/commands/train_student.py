"""``fnet-distill train-student``: stage two as a command (``student.train``; works under torchrun too)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cache.util import UserError
from pipeline.commands.choices import REPORT_TO_METAVAR, KdKind, Precision, Student, check_report_to, value
from pipeline.config_file import CONFIG_HELP, merge_config, write_run_config

# how a run was continued, not what it is: left out of OUT/config.yaml, so that it reruns from the start
NOT_RECORDED = ("resume", "extend")


def train_student_command(
    ctx: typer.Context,
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    cache: list[Path] = typer.Option(None, help="Required (here or in --config). "
                                     "Teacher cache folder (from teacher-cache) to train from. "
                                     "Repeat it to mix caches of the same teacher and tokenizer (reference "
                                     "answers, teacher-written solutions, scored student answers) stored "
                                     "with the same --topk, --temperatures and --samples."),
    cache_weights: str = typer.Option(None, help="With several --cache: comma-separated shares of each "
                                      "epoch's sequences, one per --cache in order (e.g. 1,3: a quarter from "
                                      "the first). Default: every sequence of every cache once per epoch. A "
                                      "share below a cache's own size leaves a fixed seeded subset of it "
                                      "out; above it, its sequences repeat."),
    out: Path = typer.Option(None, help="Required (here or in --config). Output folder: config.yaml (the "
                             "run's settings), checkpoint-last/, final/ (best/ with --keep-best), "
                             "metrics.jsonl, curves.png."),
    val_cache: Path = typer.Option(None, help="Validation cache from the same teacher and tokenizer (e.g. "
                                   "teacher-cache on the GSM8K test split)."),
    val_fraction: float = typer.Option(0.0, help="Hold out this fraction of --cache for validation instead "
                                       "(chosen deterministically from --seed)."),
    student: Student = typer.Option("fnet", help="Student architecture: fnet (the causal STFT FNet), qwen2 "
                                    "or llama (a stock transformers model, sized by --hidden-size, "
                                    "--layers, --ffn, --heads, --max-positions; saved as a plain "
                                    "transformers folder). Any other transformers architecture: "
                                    "--student-config with its model_type."),
    heads: int = typer.Option(None, help="Attention heads of a qwen2/llama student (default hidden-size / "
                              "64; as many key/value heads)."),
    student_config: Path = typer.Option(None, help="JSON file of CausalFNetConfig fields (e.g. a "
                                        "checkpoint's config.json), or of a transformers config with its "
                                        "model_type (e.g. qwen2); replaces --hidden-size .. --dropout."),
    init_from: Path = typer.Option(None, help="Start from the weights of a model folder instead of a random "
                                   "init: a trained student (final/, best/ or checkpoint-last/ of a "
                                   "train-student run), a cut-student folder or a pretrained transformers "
                                   "causal LM (no remote code; its tokenizer, if any, must be the cache's). "
                                   "Its architecture, shape and vocabulary replace --student, --hidden-size "
                                   ".. --dropout and must fit the cache; --compact-vocab compacts a "
                                   "transformers model to the cache's ids. Optimizer and schedule start "
                                   "afresh."),
    hidden_size: int = typer.Option(256, help="Student width d."),
    layers: int = typer.Option(4, help="Student blocks."),
    ffn: int = typer.Option(1024, help="FFN inner width."),
    window: int = typer.Option(32, help="STFT window W (tokens each mixing layer sees; FNet only)."),
    max_positions: int = typer.Option(1024, help="Position embeddings (must cover the longest sequence)."),
    dropout: float = typer.Option(0.1, help="Dropout on embeddings and FFN outputs (FNet only)."),
    steps: int = typer.Option(2000, help="Optimizer steps (the cache is repeated as needed)."),
    batch_tokens: int = typer.Option(16384, help="Padded tokens per micro-batch (B x Lmax)."),
    accum: int = typer.Option(None, help="Micro-batches per rank per optimizer step (default 1)."),
    step_tokens: int = typer.Option(None, help="Or: padded tokens per optimizer step over all ranks; sets "
                                    "the accumulation to ceil(step_tokens / batch_tokens) micro-batches."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW)."),
    min_lr: float = typer.Option(1e-4, help="Final learning rate of the cosine decay."),
    warmup: int = typer.Option(None, help="Linear warmup steps (default min(100, steps / 10))."),
    weight_decay: float = typer.Option(0.1, help="Decoupled weight decay (not on embeddings, norms, "
                                       "biases)."),
    clip: float = typer.Option(1.0, help="Gradient-norm clip (0 disables)."),
    alpha: float = typer.Option(0.2, help="Weight of the label CE; 1 - alpha goes to KD (1 = labels only)."),
    temperature: float = typer.Option(1.0, help="KD temperature tau; the cache must store it (loss is "
                                      "alpha*CE + (1-alpha)*tau^2*KD)."),
    kd: KdKind = typer.Option("topk_tail", help="KD loss. topk_tail: KL(teacher || student) over the top-k "
                              "ids plus the tail mass; topk_renorm: KL of the two top-k renormalised; "
                              "sampled: CE on the cached teacher samples (a cache made with --samples); "
                              "reverse_kl: KL(student || teacher) over top-k plus tail."),
    chunk_size: int = typer.Option(1024, help="Supervised positions per head/loss chunk (memory vs speed)."),
    compact_vocab: bool = typer.Option(False, "--compact-vocab", help="Give the student rows only for the "
                                       "token ids that occur in the caches (much smaller head). A "
                                       "transformers student keeps one shared row for all other ids and is "
                                       "saved expanded to the full vocabulary (a plain model)."),
    precision: Precision = typer.Option("auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 "
                                        "or fp16 (CUDA, with a GradScaler)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the student forward."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute block activations "
                                            "in backward (less memory)."),
    eval_every: int = typer.Option(200, help="Evaluate on the validation set every N steps (0: at the end)."),
    save_every: int = typer.Option(500, help="Write checkpoint-last/ every N steps (0: at the end)."),
    log_every: int = typer.Option(10, help="Write a metrics line every N steps (the train numbers are "
                                  "averages over those N steps); in a log file a progress line too."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoint-last/ "
                                "(same options and cache; the result equals an uninterrupted run)."),
    extend: bool = typer.Option(False, "--extend", help="With --resume: continue to a larger --steps. The "
                                "learning-rate schedule stays the original run's (warmup, cosine to its "
                                "--steps); the added steps run at --min-lr."),
    keep_best: bool = typer.Option(False, "--keep-best", help="Also keep best/: the model at the evaluation "
                                   "with the lowest validation CE (needs --val-cache or --val-fraction)."),
    report_to: str = typer.Option("none", metavar=REPORT_TO_METAVAR, callback=check_report_to,
                                  help="Also send the metrics.jsonl numbers to a tracker (rank 0): "
                                  "tensorboard (scalars in OUT/tensorboard/; pip install tensorboard), wandb "
                                  "(a Weights & Biases run kept in OUT/wandb/, config = the run config; pip "
                                  "install wandb; WANDB_MODE=offline for no upload), or tensorboard,wandb."),
    wandb_project: str = typer.Option(None, help="With --report-to wandb: the W&B project (default: "
                                      "$WANDB_PROJECT, else fnet-distill)."),
    run_name: str = typer.Option(None, help="With --report-to wandb: the W&B run name (default: the name of "
                                 "--out). --resume continues the same W&B run."),
    seed: int = typer.Option(0, help="Seed of the initialisation, data order and validation split."),
    device: str = typer.Option("auto", help="auto (CUDA if available, per LOCAL_RANK under torchrun), cpu, "
                               "cuda or cuda:N."),
    num_workers: int = typer.Option(2, help="DataLoader worker processes (0 loads in the main process)."),
    record_cache_mb: int = typer.Option(512, help="MiB of decoded cache records each loading process keeps "
                                        "in memory (per cache) so later epochs skip decoding; 0 decodes at "
                                        "every read. Results do not depend on it."),
    progress: bool = typer.Option(True, help="Progress on stderr (rank 0): a bar on a terminal, else a line "
                                  "every --log-every steps or 30 s (FNET_PROGRESS_SECONDS); the summary is "
                                  "printed either way."),
) -> None:
    """Train a student from a teacher cache (the teacher is never loaded): the causal STFT FNet, or any
    transformers causal LM (--student qwen2|llama, --student-config, --init-from a model folder).

    loss = alpha * CE(labels) + (1 - alpha) * tau^2 * KD, per supervised token of the whole optimizer step.

    Works under torchrun (gloo on CPU, nccl on GPU). --resume continues OUT/checkpoint-last/ exactly
    (its files are checked against its manifest.json first); --resume --extend --steps N goes further.

    A NaN/inf loss stops the run (exit 2) and keeps the last good checkpoint.
    """
    options = merge_config(ctx, train_student_command, {k: v for k, v in locals().items() if k != "ctx"},
                           config, required=("cache", "out"))
    from transformers.utils import logging as hf_logging

    from student.train import FINAL, TrainConfig, TrainHooks, train_student

    hf_logging.disable_progress_bar()
    caches, cache_weights, out = options["cache"], options["cache_weights"], options["out"]
    weights = None
    if cache_weights is not None:
        try:
            weights = tuple(float(w) for w in cache_weights.split(","))
        except ValueError:
            raise UserError(f"--cache-weights must be comma-separated numbers like 1,3; got "
                            f"{cache_weights!r}") from None
    # every other option is the TrainConfig field of its name (tests/test_settings.py holds them equal)
    same = {k: value(v) for k, v in options.items() if k not in ("config", "cache", "cache_weights")}
    cfg = TrainConfig(cache=caches[0], mix_caches=tuple(caches[1:]), cache_weights=weights, **same)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # OUT/config.yaml once setup has accepted the folder (a refused run leaves an existing run's file alone)
    def ready() -> None:
        if rank0:
            write_run_config(out, "train-student", options, leave_out=NOT_RECORDED)

    result = train_student(cfg, TrainHooks(ready=ready))
    if rank0:
        m = result.final_metrics
        shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "val_ce", "val_kl", "val_top1_agree")
                          if isinstance(m.get(k), float))
        typer.echo(f"trained {m['step']} steps in {result.wall_s:.1f}s ({shown}); model: {out / FINAL}")


def register(app: typer.Typer) -> None:
    app.command("train-student")(train_student_command)
