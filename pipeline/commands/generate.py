"""``fnet-distill generate``: answer one chat prompt with a trained student (``pipeline.generate``)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.generate import generate_text, load_student


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: Path = typer.Option(..., "--model", help="Student folder written by train-student (final/ or "
                                   "checkpoint-last/; weights, config and tokenizer): the FNet or a "
                                   "transformers student; any causal LM folder with its tokenizer works "
                                   "too."),
        prompt: str = typer.Option(..., "--prompt", help="User message; the tokenizer's chat template is "
                                   "applied."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Generation budget (cut to "
                                           "the model's positions)."),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="Sampling temperature (0: "
                                          "greedy)."),
        top_k: int = typer.Option(0, "--top-k", min=0, help="Sample from the k most likely ids (0: all)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the sampling (unused when greedy)."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA if available), cpu, cuda or cuda:N."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the folder's files against its "
                                    "manifest.json first (when it has one); --no-verify reads a folder "
                                    "edited on purpose."),
    ) -> None:
        """Generate an answer with a trained student: the FNet with its rolling-state decoder, a transformers
        student (--student, cut-student) with transformers' generate on its KV cache."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in a log
        m, tok = load_student(model, device, verify=verify)
        typer.echo(generate_text(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k or None, seed=seed))
