"""The package's import graph: no circle among its modules' imports, and the method registry imports no method.

Read from the source with `ast` (nothing is imported): an edge A -> B for every `import` / `from ... import` of a
uft_ray module B in module A, at its top (what runs on import: `if TYPE_CHECKING` blocks left out) or, for the
second graph, anywhere, function bodies included (a circle kept out of sight by an import inside a function is a
circle all the same when the function runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "uft_ray"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _edges(name: str, path: Path, known: dict[str, Path], *, in_functions: bool) -> set[str]:
    """The uft_ray modules `name` imports (a `from pkg import x` names pkg.x when that is a module, else pkg)."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()

    def add(target: str) -> None:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target.split(".")[0] == PACKAGE and target != name:
            out.add(target)

    def walk(body: list[ast.stmt], in_function: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import) and (in_functions or not in_function):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom) and (in_functions or not in_function):
                base = node.module or ""
                if node.level:
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                walk(node.body, True)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    walk(getattr(node, field, None) or [], in_function)

    walk(ast.parse(path.read_text()).body, False)
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module."""
    order, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return out


def _graph(*, in_functions: bool) -> dict[str, set[str]]:
    known = _modules()
    return {name: _edges(name, path, known, in_functions=in_functions) for name, path in known.items()}


def test_the_graph_reader_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_circle_among_the_modules_top_level_imports():
    graph = _graph(in_functions=False)
    assert len(graph) > 50 and "uft_ray.runner" in graph["uft_ray.uft.driver"]  # the reader reads the package
    assert _circles(graph) == []


def test_the_method_registry_the_cluster_model_and_the_preflight_close_no_circle_even_through_functions():
    circles = _circles(_graph(in_functions=True))
    mine = {"uft_ray.methods", "uft_ray.resources", "uft_ray.cluster_spec", "uft_ray.cluster_probe",
            "uft_ray.preflight", "uft_ray.runner", "uft_ray.driver", "uft_ray.uft.driver", "uft_ray.uft.method",
            "uft_ray.rft.driver", "uft_ray.rft.method", "uft_ray.config.validation", "uft_ray.config.schema"}  # fmt: skip
    assert [c for c in circles if mine & set(c)] == []
    assert _graph(in_functions=True)["uft_ray.methods"] == set()  # it imports the methods by name, when asked
