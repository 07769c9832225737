"""``fnet-distill``: one Typer app assembled from the command modules in ``pipeline.commands`` (each imports
torch/transformers inside its command body, so ``--help`` stays fast)."""

from __future__ import annotations

import difflib
import errno
import os
import re
import shutil
import sys

import typer

try:  # typer >= 0.2x vendors click; older releases use the click package
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc

from cache.util import UserError
from pipeline import __version__
from pipeline.commands import cache as cache_commands
from pipeline.commands import cut_student, demo, evaluate, generate, teacher_cache, train_student

app = typer.Typer(
    name="fnet-distill",
    help="Distil a causal LM into a causal STFT FNet student from an offline, sparse teacher cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: flags show as flags (``--compact-vocab``, ``--progress / --no-progress``), values with their
    # type (``--steps <int>``); the rich panels would label every flag ``<bool>`` as if it took a value.
    rich_markup_mode=None,
    context_settings={"max_content_width": 110},
)
cache_app = typer.Typer(help="Inspect and check a teacher cache.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(cache_app, name="cache")


def _print_version(value: bool) -> None:
    if value:
        print(f"fnet-distill {__version__}")
        raise typer.Exit()


def quiet_library_bars(stream=None) -> None:
    """When stderr is not a terminal (a log file, SLURM, CI), turn off the progress bars of the libraries
    underneath (transformers, huggingface_hub, datasets, any tqdm): their carriage-return redraws would pile
    up in the log between our own plain progress lines. Set in the environment, so worker processes and
    torchrun ranks inherit it (a value the user set is kept), and in the libraries already imported. Our own
    ``cache.progress`` lines are not affected."""
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    if "huggingface_hub" in sys.modules:  # these read the environment once, at import
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    quiet_library_bars()  # before any command imports them


cache_commands.register(cache_app)
teacher_cache.register(app)
generate.register(app)
train_student.register(app)
cut_student.register(app)
evaluate.register(app)
demo.register(app)


_RERUN = ("then rerun the same command (teacher-cache resumes from its last committed unit, train-student "
          "with --resume)")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what failed and what to do; the free-disk-space hint only for a full disk."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        # copytree gathers one (src, dst, why) per file that failed; show the first and a count
        src, dst, why = e.args[0][0]
        more = len(e.args[0]) - 1
        full = any("No space left" in str(w) or "Disk quota" in str(w) for _, _, w in e.args[0])
        msg = f"copying {src} to {dst} failed: {why}" + (f" (and {more} more files)" if more else "")
        return f"{msg}; " + (f"free disk space, {_RERUN}" if full else "check the paths and permissions")
    if e.errno in _DISK_FULL:
        return f"{e}; free disk space, {_RERUN}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e}; fix the permissions or choose another path"
    return f"{e}; check the path"


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0", "t", "f", "y", "n"}


def usage_error_line(e: click_exc.UsageError) -> str:
    """One line for a command-line mistake (click prints usage + a boxed error otherwise)."""
    msg = e.format_message().strip().rstrip(".").replace("Value error, ", "")  # typer's validation prefix
    near = None
    wrong = re.search(r"'([^']*)' is not one of ((?:'[^']*'(?:, )?)+)", msg)
    if wrong:  # a choice option: name the choice meant by a near miss (topk-tail, TopK_Tail, tensorbord)
        choices = re.findall(r"'([^']*)'", wrong.group(2))
        given = wrong.group(1).strip().lower().replace("-", "_")
        digits = [c for c in given if c.isdigit()]  # fp64 is not a typo of fp16
        near = next((c for c in difflib.get_close_matches(given, choices, n=3, cutoff=0.8)
                     if [d for d in c if d.isdigit()] == digits), None)
    extra = re.search(r"unexpected extra argument(?:s|\(s\))? \((.*)\)", msg)
    if extra and extra.group(1).split()[0].lower() in _BOOL_WORDS:
        msg += "; yes/no options are flags: write the flag alone (e.g. --compact-vocab, --no-progress)"
    command = e.ctx.command_path if e.ctx is not None else "fnet-distill"
    if near is not None:
        return f"{msg}; did you mean {near!r}? See {command} --help"
    return f"{msg}; see {command} --help"


def main() -> None:
    try:
        rv = app(standalone_mode=False)
    except click_exc.NoArgsIsHelpError as e:
        e.show()
        sys.exit(2)
    except click_exc.UsageError as e:
        print(f"error: {usage_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except click_exc.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # Nothing half-written is left under a final name (every writer goes through a temporary name), so
        # the fix is to free space or fix the path and rerun.
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException as e:
        # SIGINT/SIGTERM in train-student or teacher-cache (cache.interrupt.Interrupted, a BaseException so
        # that typer passes it through): one line saying what was kept and the command that goes on, exit
        # 130/143. The module is loaded whenever one was raised; importing it here would slow --help.
        interrupt = sys.modules.get("cache.interrupt")
        if interrupt is None or not isinstance(e, interrupt.Interrupted):
            raise
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; rank 0 speaks
            print(str(e), file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    if rv == 130:  # typer turns Ctrl-C inside a command into exit code 130
        print("interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)
