"""``fnet-distill generate``: answer one chat prompt with a trained student (``pipeline.generate``)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.generate import generate_text, load_student


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        model: Path = typer.Option(..., "--model", help="student checkpoint folder (weights + tokenizer)"),
        prompt: str = typer.Option(..., "--prompt", help="user message; the chat template is applied"),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
        temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy"),
        top_k: int = typer.Option(0, "--top-k", min=0, help="sample from the k most likely ids (0 = all)"),
        seed: int = typer.Option(0, "--seed"),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    ) -> None:
        """Generate an answer with a trained student (fast rolling-state decoder)."""
        m, tok = load_student(model, device)
        typer.echo(generate_text(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k or None, seed=seed))
