"""Regenerate the README's CLI reference from the real `--help` output: `python docs/gen_cli_reference.py`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = [[], ["teacher-cache"], ["cache", "info"], ["cache", "verify"], ["train-student"], ["eval"],
            ["generate"], ["demo"]]


def help_text(args: list[str]) -> str:
    env = dict(os.environ, COLUMNS="110", NO_COLOR="1", TERM="dumb")
    exe = Path(sys.executable).with_name("fnet-distill")
    out = subprocess.run([str(exe), *args, "--help"],
                         capture_output=True, text=True, env=env, check=True).stdout
    return "\n".join(line.rstrip() for line in out.splitlines()).strip("\n")


def main() -> None:
    parts = ["<!-- CLI -->", "## CLI reference", "",
             "Generated from the real `--help` output by `python docs/gen_cli_reference.py`.", ""]
    for args in COMMANDS:
        parts += [f"### `fnet-distill {' '.join(args)} --help`".replace("  ", " "), "", "```",
                  help_text(args), "```", ""]
    parts.append("<!-- /CLI -->")
    text = README.read_text()
    new = re.sub(r"<!-- CLI -->.*<!-- /CLI -->", lambda _: "\n".join(parts), text, flags=re.S)
    README.write_text(new)


if __name__ == "__main__":
    main()
