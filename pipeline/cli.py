"""``fnet-distill``: one Typer app assembled from the command modules in ``pipeline.commands`` (each imports
torch/transformers inside its command body, so ``--help`` stays fast)."""

from __future__ import annotations

import sys

import typer

from cache.util import UserError
from pipeline.commands import cache as cache_commands
from pipeline.commands import demo, evaluate, generate, teacher_cache, train_student

app = typer.Typer(
    name="fnet-distill",
    help="Distil a causal LM into a causal STFT FNet student from an offline, sparse teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect and check a teacher cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

cache_commands.register(cache_app)
teacher_cache.register(app)
generate.register(app)
train_student.register(app)
evaluate.register(app)
demo.register(app)


def main() -> None:
    try:
        app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # Disk full, read-only or missing paths: nothing half-written is left under a final name (every
        # writer goes through a temporary name), so the fix is to free space / fix the path and rerun.
        print(f"error: {e}; free disk space or fix the path/permissions, then rerun the same command "
              "(teacher-cache resumes from its last committed unit, train-student with --resume)",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
