"""The packages import one way: ``cache`` <- ``student`` <- ``pipeline``, and no project module imports itself
back through others. Every ``import`` is read from the source (AST), including imports inside functions.
Command-line (Typer) code lives only in ``pipeline/commands/`` and ``pipeline/cli.py``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "student", "pipeline")
# What each package may import of the project, besides itself.
ALLOWED = {"cache": set(), "student": {"cache"}, "pipeline": {"cache", "student"}}


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
