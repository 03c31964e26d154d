"""The floor plan holds: imports point one way, no import cycles, no private names borrowed across
modules, no module past the size a reader can hold (STYLE.md 9, ARCHITECTURE.md).

Read statically (module-level and function-local imports alike), so a cycle hidden inside a
function, which runs fine until the day the import order changes, is caught too.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from conftest import REPO

SRC = REPO / "src"
MAX_LINES = 400

# Layers, lowest first: a module imports from its own layer or lower ones, never higher.
LAYERS = [
    ("core",),
    ("config", "data"),
    ("collection", "curation", "validation", "tokenizer", "model", "train", "serving", "tracking", "evaluation", "tune",
     "stack"),
    ("stages",),
    ("cli", "ui", "__main__", "__init__"),
]


def _layer(module: str) -> int:
    if module.endswith(".__main__"):  # `python -m lmforge.x`: an entry point, like the CLI
        return len(LAYERS) - 1
    part = module.split(".")[1] if "." in module else "__init__"
    for level, names in enumerate(LAYERS):
        if part in names:
            return level
    raise AssertionError(f"{module} is in no layer of tests/unit/test_layout.py: add its package to LAYERS")


@cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "lmforge").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _resolve(name: str) -> str | None:
    """The lmforge module that ``name`` (a module or a name inside one) refers to."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for every import statement of ``module``."""
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules()}
    for module in modules():
        for base, name, _ in imports(module):
            target = _resolve(f"{base}.{name}" if name else base)
            if target and target != module and not module.startswith(f"{target}."):  # a package's own __init__
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_in_src():
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            if _layer(target) > _layer(module):
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_private_name_is_imported_from_another_module():
    borrowed = []
    for module in modules():
        for base, name, line in imports(module):
            private = [part for part in [*base.split("."), name] if part.startswith("_") and not part.startswith("__")]
            if private and (base.startswith("lmforge") or not base):
                borrowed.append(f"{modules()[module].relative_to(REPO)}:{line} imports {name or base} from {base}")
    assert borrowed == []


# What the rest of lmforge may use of serving: its API (resolve, serve, adapters), the ONNX export,
# the engine's front (Engine, SamplingParams) and the Ray Serve platform's deploy/stop (the deploy stage's
# serving.platform: ray). Everything else is serving's own business.
SERVING_PUBLIC = ("lmforge.serving", "lmforge.serving.api", "lmforge.serving.export", "lmforge.serving.engine",
                  "lmforge.serving.ray_serve")


def test_nothing_outside_serving_imports_its_internals():
    reaching = []
    for module in modules():
        if module.startswith("lmforge.serving"):
            continue
        for base, name, line in imports(module):
            target = _resolve(f"{base}.{name}" if name else base) or ""
            if target.startswith("lmforge.serving") and target not in SERVING_PUBLIC:
                reaching.append(f"{modules()[module].relative_to(REPO)}:{line} imports {target}")
    assert reaching == []


def test_no_module_is_past_the_size_a_reader_holds():
    too_long = []
    for root in ("src", "flows", "tasks", "bench"):
        for path in (REPO / root).rglob("*.py"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert too_long == []


def test_every_noqa_and_type_ignore_names_its_rule_and_reason():
    """A silenced check says which rule and why: a noqa comment names its codes and then a reason
    after a dash; a type-ignore comment names its error codes in brackets and then a reason."""
    bare = []
    for root in ("src", "flows", "tasks", "bench", "tests"):
        for path in (REPO / root).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                noqa = re.search(r"#\s*noqa\b(.*)", line)
                if noqa and not re.match(r":\s*[A-Z]+\d+(,\s*[A-Z]+\d+)*\s+[-–(]\s*\S", noqa.group(1)):
                    bare.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
                ignore = re.search(r"#\s*type:\s*ignore(.*)", line)
                if ignore and not re.match(r"\[[a-z-]+(,\s*[a-z-]+)*\]\s*(#|-|–)\s*\S", ignore.group(1)):
                    bare.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert bare == []
