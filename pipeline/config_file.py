"""Run configs: ``--config FILE.yaml`` for ``teacher-cache``, ``train-student`` and ``demo``.

A config file is a YAML mapping from a command's option names (``--batch-tokens`` is ``batch_tokens``) to
values. Options given on the command line win over the file; the file wins over the options' defaults
(``merge_config``, which asks click where each value came from). Every run writes the settings it ran with,
file, flags and defaults merged, to ``config.yaml`` in its output folder (``write_run_config``), so
``--config OUT/config.yaml`` reruns it. Paths are read as on the command line: relative to the working
directory.

The option declarations in ``pipeline/commands/*.py`` stay the only place where a name, type and default is
written; a key the command does not have, or a value of the wrong type, is refused in one line naming the
file and the key.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from cache.util import UserError, atomic_write_bytes

CONFIG_FILE = "config.yaml"  # in every run folder (and in a teacher cache): the settings the run used
CONFIG_HELP = ("YAML file of this command's options (names with _ for -, e.g. batch_tokens: 8192), such as a "
               "run folder's config.yaml or one in configs/; options given on the command line override it.")
# options that take a comma-separated list on the command line: a config file may give a YAML list instead
COMMA_LISTS = frozenset({"temperatures", "cache_weights", "report_to"})
_FROM_USER = ("COMMANDLINE", "ENVIRONMENT")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a config file; one line when the file is missing, not YAML or not a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror or e}); pass a YAML file such as "
                        f"configs/*.yaml or a run folder's {CONFIG_FILE}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"--config {path}: not valid YAML{where} ({getattr(e, 'problem', None) or e}); "
                        "write one 'name: value' per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"--config {path}: must be a mapping of option names to values (name: value per "
                        f"line), got {type(data).__name__}")
    return data


def option_types(command: Callable[..., Any]) -> dict[str, Any]:
    """The annotated type of each option of a command function (``ctx`` left out)."""
    hints = typing.get_type_hints(command)
    hints.pop("return", None)
    return {k: v for k, v in hints.items() if k != "ctx" and not _is_context(v)}


def _is_context(tp: Any) -> bool:
    return isinstance(tp, type) and tp.__name__ == "Context"


def check_value(path: Path, key: str, tp: Any, raw: Any, *, required: bool = False) -> Any:
    """``raw`` (a YAML value) as the option's type ``tp``, or one line naming the file and the key."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1]
        items = raw if isinstance(raw, list) else [raw]
        if raw is None or not items:
            if required:
                raise UserError(f"--config {path}: {key} needs a value (a list of {_name(item)})")
            return None
        return [check_value(path, key, item, x) for x in items]
    if raw is None:
        if required:
            raise UserError(f"--config {path}: {key} needs a value ({_name(tp)})")
        return None
    if key in COMMA_LISTS and tp is str and isinstance(raw, list) and raw \
            and all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in raw):
        return ",".join(str(x) for x in raw)
    ok: Any = None
    if tp is bool:
        ok = raw if isinstance(raw, bool) else None
    elif tp is int:
        ok = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
    elif tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            ok = float(raw)
        elif isinstance(raw, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                ok = float(raw)
            except ValueError:
                ok = None
    elif tp is str:
        ok = raw if isinstance(raw, str) else None
    elif tp is Path:
        ok = Path(raw) if isinstance(raw, str) and raw else None
    elif isinstance(tp, type) and issubclass(tp, Enum):
        names = [m.value for m in tp]
        if isinstance(raw, str) and raw in names:
            return tp(raw)
        raise UserError(f"--config {path}: {key} must be one of {'|'.join(names)} (got {raw!r})")
    else:  # pragma: no cover - an option type this reader does not know yet
        raise UserError(f"--config {path}: {key} cannot be set from a config file; give it as a flag")
    if ok is None:
        raise UserError(f"--config {path}: {key} must be {_name(tp)} (got {raw!r}, a "
                        f"{type(raw).__name__})")
    return ok


def _name(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))


def merge_config(ctx: Any, command: Callable[..., Any], values: dict[str, Any],
                 path: str | os.PathLike | None, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``values`` (the command's parsed options) with the entries of the config file at ``path`` applied to
    every option the user did not give on the command line. ``required``: options that must end up with a
    value (declared with a default of None so that a config file can give them)."""
    types = option_types(command)
    out = {k: values[k] for k in types}  # locals() may hold more (a nested function's variables)
    if path is not None:
        path = Path(path)
        for key, raw in read_config(path).items():
            if key not in types or key == "config":
                names = [k for k in types if k != "config"]
                near = difflib.get_close_matches(key.replace("-", "_"), names, 1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise UserError(f"--config {path}: unknown key {key!r}; {hint}the keys are the options of "
                                f"`fnet-distill {ctx.info_name} --help`, with _ for -")
            value = check_value(path, key, types[key], raw, required=key in required)
            source = ctx.get_parameter_source(key)
            if source is None or source.name not in _FROM_USER:
                out[key] = value
    for key in required:
        if out.get(key) in (None, []):
            where = f"as {key} in a --config file" if path is None else f"as {key} in {path}"
            raise UserError(f"Missing option '--{key.replace('_', '-')}': give it on the command line or "
                            f"{where}; see fnet-distill {ctx.info_name} --help")
    return out


def plain(value: Any) -> Any:
    """A value as it goes into a YAML file: enums as their string, paths as strings, lists as lists."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def run_config_yaml(command_name: str, values: dict[str, Any], *, leave_out: tuple[str, ...] = ()) -> str:
    """The text of a run's ``config.yaml``: every option (``config`` and ``leave_out`` aside) in the
    command's order."""
    body = {k: plain(v) for k, v in values.items() if k != "config" and k not in leave_out}
    head = (f"# fnet-distill {command_name}: the settings of this run (config file, flags and defaults "
            f"merged).\n# Rerun it with: fnet-distill {command_name} --config <this file> [--out NEW]\n")
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def write_run_config(folder: str | os.PathLike, command_name: str, values: dict[str, Any], *,
                     leave_out: tuple[str, ...] = ()) -> Path:
    """Write ``folder/config.yaml`` atomically (a reader never sees half a file); returns its path."""
    path = Path(folder) / CONFIG_FILE
    atomic_write_bytes(path, run_config_yaml(command_name, values, leave_out=leave_out).encode())
    return path
