"""``fnet-distill``: one Typer app; each stage registers its own commands from its own module."""

from __future__ import annotations

import sys

import typer

from cache.util import UserError

app = typer.Typer(
    name="fnet-distill",
    help="Distil a causal LM into a causal STFT FNet student from an offline, sparse teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="Inspect and check a teacher cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _register() -> None:
    # Each module adds its commands; imports of torch/transformers stay inside the command bodies.
    from cache import cli as cache_cli
    from pipeline import demo_cli, teacher_cli
    from student import cli as student_cli
    from student import evaluate, train

    cache_cli.register(cache_app)
    teacher_cli.register(app)
    student_cli.register(app)
    train.register(app)
    evaluate.register(app)
    demo_cli.register(app)


_register()


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
