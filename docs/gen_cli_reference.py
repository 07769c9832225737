"""Regenerate docs/cli.md from the real `--help` output: `python docs/gen_cli_reference.py`.

`--check` exits 1 when docs/cli.md differs from what the current code prints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "cli.md"
COMMANDS = [[], ["teacher-cache"], ["cache", "info"], ["cache", "verify"], ["train-student"], ["eval"],
            ["generate"], ["demo"], ["cut-student"]]
HEADER = """# Command-line reference

Generated from the real `--help` output by `python docs/gen_cli_reference.py`; do not edit by hand.

Every command prints one line starting with `error:` and exits with 2 on a bad input (what is wrong, what to
do); yes/no options are flags (`--compact-vocab`, `--no-progress`) and take no value; an option with a fixed
set of values lists it (`--kd <topk_tail|...>`) and refuses anything else with that list (and a "did you
mean" for a near miss such as `topk-tail`). Progress goes to stderr: a bar on a terminal, one plain line every
30 s in a log file (`FNET_PROGRESS_SECONDS` sets the interval), where the libraries' own bars are turned off.
"""


def help_text(args: list[str]) -> str:
    env = dict(os.environ, COLUMNS="110", NO_COLOR="1", TERM="dumb")
    exe = Path(sys.executable).with_name("fnet-distill")
    out = subprocess.run([str(exe), *args, "--help"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return "\n".join(line.rstrip() for line in out.splitlines()).strip("\n")


def render() -> str:
    parts = [HEADER]
    for args in COMMANDS:
        parts += [f"## `{' '.join(['fnet-distill', *args])}`", "", "```", help_text(args), "```", ""]
    return "\n".join(parts)


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python docs/gen_cli_reference.py", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text)


if __name__ == "__main__":
    main()
