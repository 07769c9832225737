"""The packages import one way: ``cache`` <- ``student`` <- ``pipeline``, and no project module imports itself
back through others. Every ``import`` is read from the source (AST), including imports inside functions.
Command-line (Typer) code lives only in ``pipeline/commands/`` and ``pipeline/cli.py``. The benchmarks
(``bench/``) import library modules and each other, never a test module or the demo's runner; nothing of the
project imports ``cache.format``, the old name kept for code written against 0.1.0."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "student", "pipeline")
# What each package may import of the project, besides itself.
ALLOWED = {"cache": set(), "student": {"cache"}, "pipeline": {"cache", "student"}}
# Imports a benchmark may not have, and those that remain for now (file, module); an entry must be removed
# once its import is gone.
BENCH_FORBIDDEN = ("tests", "pipeline.demo.run")
BENCH_KNOWN: set[tuple[str, str]] = set()


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
