"""The packages import one way: ``cache`` <- ``student`` <- ``pipeline``, and no project module imports itself
back through others. Every ``import`` is read from the source (AST), including imports inside functions.
Command-line (Typer) code lives only in ``pipeline/commands/`` and ``pipeline/cli.py``. The benchmarks
(``bench/``) import library modules and each other, never a test module or the demo's runner; nothing of the
project imports ``cache.format``, the old name kept for code written against 0.1.0.

The teacher pass (stage one) and the student package never import each other, inside functions neither,
and importing stage one loads no ``student`` module (checked in a fresh interpreter). Outside the command
line (``pipeline/cli.py``, ``pipeline/commands/``) an import sits inside a function only where
``LATE_IMPORTS`` names it with its reason."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "student", "pipeline")
# What each package may import of the project, besides itself.
ALLOWED = {"cache": set(), "student": {"cache"}, "pipeline": {"cache", "student"}}
# Imports a benchmark may not have, and those that remain for now (file, module); an entry must be removed
# once its import is gone.
BENCH_FORBIDDEN = ("tests", "pipeline.demo.run")
BENCH_KNOWN: set[tuple[str, str]] = set()


# The teacher pass: the modules of stage one (``teacher-cache``). Neither they nor anything they import
# reaches ``student``, and nothing in ``student`` reaches them.
STAGE_ONE = ("pipeline.teacher_cache", "pipeline.teacher", "pipeline.write")
# Where imports may sit inside functions freely: the command line, which keeps ``--help`` from loading torch.
CLI_EDGE = ("pipeline.cli", "pipeline.commands")
# Every other import inside a function: module -> imported names (a name covers its submodules) -> reason.
HELP = ("read at ``fnet-distill --help`` (a command module imports it at its top): torch, transformers and "
        "the rest load when a command runs")
BACKEND = "a shard format's library loads only when a cache of that format is opened"
OPTIONAL = "an optional or plotting library, loaded only when that output is asked for"
DEMO = ("any ``pipeline.demo`` module runs the package's ``__init__`` (``build_demo_assets``); the teacher's "
        "and tokenizer's libraries load only when the assets are built")
LATE_IMPORTS = {
    "cache.arrow_backend": {"pyarrow": BACKEND},
    "cache.zarr_backend": {"zarr": BACKEND},
    "student.metrics": {"matplotlib": OPTIONAL},
    "student.reporting": {"torch.utils.tensorboard": OPTIONAL, "wandb": OPTIONAL},
    "pipeline.rows": {"pyarrow": HELP, "datasets": HELP},
    "pipeline.data": {"transformers": HELP},
    "pipeline.hub": {"huggingface_hub": HELP},
    "pipeline.evaluate": {"torch": HELP, "transformers": HELP, "cache.device": HELP, "cache.progress": HELP,
                          "pipeline.teacher": HELP, "student.checkpoint": HELP, "student.modeling": HELP},
    "pipeline.generate": {"torch": HELP},
    "pipeline.demo.assets": {"transformers": DEMO},
    "pipeline.demo.teacher": {"torch": DEMO, "transformers": DEMO, "student.schedule": DEMO},
    "pipeline.demo.tokenizer": {"tokenizers": DEMO, "transformers": DEMO},
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for pkg in PACKAGES if (root / pkg).is_dir()
            for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(project module imported, line) for every import statement anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            # ``from pkg import sub`` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            # the longest project module the dotted name starts with (``student.train.fit`` -> student.train)
            parts = t.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts:
                found.append((".".join(parts), node.lineno))
    return found


def imported_names(path: Path) -> list[tuple[str, int]]:
    """(dotted name, line) of every import statement anywhere in the file, unresolved: ``from a.b import c``
    gives ``a.b.c`` (c may be a module or a name in it); relative imports keep their leading dots."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found += [(f"{base}.{a.name}" if base.strip(".") else base + a.name, node.lineno)
                      for a in node.names]
    return found


def bench_imports_of_tests_or_runner(root: Path) -> list[tuple[str, str, int]]:
    """(bench file, forbidden module, line) for every import in ``bench/*.py`` of a test module (the
    ``tests`` package, or a module of ``tests/`` reached through sys.path such as ``helpers``) or of
    ``pipeline.demo.run``."""
    bench = {p.stem for p in (root / "bench").glob("*.py")}
    test_modules = {p.stem for p in (root / "tests").glob("*.py")} - bench
    found = []
    for path in sorted((root / "bench").glob("*.py")):
        rel = path.relative_to(root).as_posix()
        for name, line in imported_names(path):
            top = name.split(".")[0]
            hit = ("tests" if top == "tests" or top in test_modules else
                   next((f for f in BENCH_FORBIDDEN if name == f or name.startswith(f + ".")), None))
            if hit is not None and (rel, hit, line) not in found:
                found.append((rel, hit, line))
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The module graph and every import that points up a layer, as ``file:line: a imports b``."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    upward = []
    for name, path in modules.items():
        layer = name.split(".")[0]
        for target, line in imports_of(name, path, modules):
            if target != name:
                graph[name].add(target)
            other = target.split(".")[0]
            line_text = f"{path.relative_to(root)}:{line}: {name} imports {target}"
            if other != layer and other not in ALLOWED[layer] and line_text not in upward:
                upward.append(line_text)
    return graph, upward


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_no_import_points_up_a_layer():
    _, upward = import_graph(ROOT)
    assert not upward, "imports against the layering cache <- student <- pipeline:\n" + "\n".join(upward)


def test_no_import_cycle_between_project_modules():
    graph, _ = import_graph(ROOT)
    assert len(graph) > 30  # the walk found the packages
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_command_line_code_lives_in_pipeline_commands():
    """``student/`` and ``cache/`` carry no Typer code; each command module is in ``pipeline/commands``."""
    found = []
    for name, path in project_modules(ROOT).items():
        tree = ast.parse(path.read_text(), filename=str(path))
        uses = any(isinstance(n, ast.Import) and any(a.name.split(".")[0] == "typer" for a in n.names)
                   or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "typer"
                   for n in ast.walk(tree))
        if uses and not (name.startswith("pipeline.commands.") or name == "pipeline.cli"):
            found.append(name)
    assert not found, f"Typer imported outside pipeline/commands and pipeline/cli.py: {found}"


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    files = {
        "cache/__init__.py": "",
        "cache/a.py": "def f():\n    from student import b\n",  # inside a function, still counted
        "student/__init__.py": "",
        "student/b.py": "import cache.a\nfrom . import c\n",
        "student/c.py": "from student.b import x\n",
        "pipeline/__init__.py": "",
        "pipeline/d.py": "from student.c import y\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph, upward = import_graph(tmp_path)
    assert upward == ["cache/a.py:2: cache.a imports student.b"]
    assert graph["student.b"] == {"cache.a", "student.c"}
    assert graph["pipeline.d"] == {"student.c"}
    assert cycles(graph) == [["cache.a", "student.b", "student.c"]]


def test_benchmarks_import_library_modules_not_tests_or_the_demo_runner():
    found = bench_imports_of_tests_or_runner(ROOT)
    new = [f"{f}:{line}: imports {m}" for f, m, line in found if (f, m) not in BENCH_KNOWN]
    assert not new, ("benchmarks import library modules (cache, student, pipeline, bench), never tests or "
                     "pipeline.demo.run; move what they need into a library module:\n" + "\n".join(new))
    gone = BENCH_KNOWN - {(f, m) for f, m, _ in found}
    assert not gone, f"remove these from BENCH_KNOWN, their imports are gone: {sorted(gone)}"


def test_nothing_in_the_project_imports_the_cache_format_shim():
    """``cache/format.py`` only re-exports the cache's names for older user code; the project imports them
    from their homes (cache.writer, cache.reader, cache.verify, cache.manifest, cache.schema)."""
    found = [f"{p.relative_to(ROOT)}:{line}: {name}"
             for folder in (*PACKAGES, "tests", "bench") for p in sorted((ROOT / folder).rglob("*.py"))
             if p != ROOT / "cache" / "format.py"
             for name, line in imported_names(p) if name.split(".")[:2] == ["cache", "format"]]
    assert not found, ("import these from cache.writer / reader / verify / manifest / schema:\n"
                       + "\n".join(found))


def test_the_bench_check_catches_a_test_import_and_the_demo_runner(tmp_path):
    files = {
        "bench/a.py": "from tests.test_modeling import ref\nfrom peak_rss import x\n",
        "bench/b.py": "def f():\n    from pipeline.demo import run\n    from pipeline.demo.assets import y\n",
        "bench/c.py": "import helpers\nfrom pipeline.demo.run import machine_info\n",
        "bench/peak_rss.py": "",
        "tests/helpers.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert bench_imports_of_tests_or_runner(tmp_path) == [
        ("bench/a.py", "tests", 1), ("bench/b.py", "pipeline.demo.run", 2), ("bench/c.py", "tests", 1),
        ("bench/c.py", "pipeline.demo.run", 2)]


def late_imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement inside a function (or lambda) of the module;
    relative imports resolved."""
    found: list[tuple[str, int]] = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if in_function and isinstance(child, ast.Import):
                found.extend((a.name, child.lineno) for a in child.names)
            elif in_function and isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join([*pkg, base] if base else pkg)
                found.append((base, child.lineno))
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def unlisted_late_imports(root: Path, listed: dict[str, dict[str, str]]) -> tuple[list[str], list[str]]:
    """Imports inside functions outside ``CLI_EDGE`` that ``listed`` does not name (``file:line: module
    imports name``), and the entries of ``listed`` that no longer match any import (``module: name``)."""
    new, used = [], set()
    for name, path in project_modules(root).items():
        if any(name == e or name.startswith(e + ".") for e in CLI_EDGE):
            continue
        for target, line in late_imports(name, path):
            key = next((k for k in listed.get(name, {}) if target == k or target.startswith(k + ".")), None)
            if key is None:
                new.append(f"{path.relative_to(root)}:{line}: {name} imports {target}")
            used.add((name, key))
    stale = [f"{m}: {k}" for m, keys in listed.items() for k in keys if (m, k) not in used]
    return new, stale


def test_imports_inside_functions_only_at_the_command_line_or_listed_with_a_reason():
    new, stale = unlisted_late_imports(ROOT, LATE_IMPORTS)
    assert not new, ("import these at the module's top (or, if there is a reason not to, add it to "
                     "LATE_IMPORTS in tests/test_layers.py with that reason):\n" + "\n".join(new))
    assert not stale, f"remove these from LATE_IMPORTS, no function imports them any more: {stale}"


def test_the_late_import_check_catches_an_unlisted_import(tmp_path):
    files = {
        "cache/__init__.py": "",
        "cache/a.py": "import json\n\ndef f():\n    import zarr.storage\n    from . import b\n",
        "cache/b.py": "import os\n\nclass C:\n    def m(self):\n        import torch\n",
        "pipeline/__init__.py": "",
        "pipeline/commands/__init__.py": "",
        "pipeline/commands/run.py": "def main():\n    import torch\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    new, stale = unlisted_late_imports(tmp_path, {"cache.a": {"zarr": "why", "numpy": "why"}})
    assert new == ["cache/a.py:5: cache.a imports cache", "cache/b.py:5: cache.b imports torch"]
    assert stale == ["cache.a: numpy"]


def reachable(graph: dict[str, set[str]], start: tuple[str, ...]) -> set[str]:
    seen, todo = set(start), list(start)
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_teacher_pass_and_the_student_never_import_each_other():
    """Every import counts, inside functions too: stage one's modules and all they import reach no
    ``student`` module, and no ``student`` module reaches stage one."""
    graph, _ = import_graph(ROOT)
    assert all(m in graph for m in STAGE_ONE), f"stage one's modules moved: {STAGE_ONE}"
    from_stage_one = sorted(m for m in reachable(graph, STAGE_ONE) if m.split(".")[0] == "student")
    assert not from_stage_one, f"the teacher pass reaches the student package: {from_stage_one}"
    students = tuple(m for m in graph if m.split(".")[0] == "student")
    to_stage_one = sorted(reachable(graph, students) & set(STAGE_ONE))
    assert not to_stage_one, f"the student package reaches the teacher pass: {to_stage_one}"


def test_importing_stage_one_loads_no_student_module():
    """In a fresh interpreter: ``student/__init__`` registers the FNet with transformers, stage one must not
    run it."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in STAGE_ONE)
            + "print(sorted(m for m in sys.modules if m == 'student' or m.startswith('student.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing stage one loaded: {out.stdout.strip()}"


def test_the_cache_format_needs_neither_torch_nor_the_run_helpers():
    """``cache/`` also holds what both stages need while they run (device and rank, progress, stop signals);
    the format's own modules (schema, codecs, backends, manifest, writer, reader, verify) import none of them
    and no torch, so reading or checking a cache needs neither."""
    run_helpers = ("cache.device", "cache.progress", "cache.interrupt")
    found = [f"{p.relative_to(ROOT)}:{line}: {name}"
             for m, p in project_modules(ROOT).items() if m.split(".")[0] == "cache" and m not in run_helpers
             for name, line in imported_names(p)
             if name.split(".")[0] == "torch"
             or any(name == h or name.startswith(h + ".") for h in run_helpers)]
    assert not found, "the cache format imports torch or a run helper:\n" + "\n".join(found)
