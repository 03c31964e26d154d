"""Built-in corpus: docstrings of the Python standard library installed on this machine.

The demo pipeline needs English text and an instruction set without any network, so both are
derived from the stdlib's own documentation. Sources are read with :mod:`ast`, never imported:
importing runs module code (``antigravity`` opens a browser, ``this`` prints, ``tkinter`` wants a
display), while parsing is side-effect free, faster, and gives the same answer on every run of the
same Python build. Modules written in C (``math``, ``sys``) have no source and are not covered.

    >>> docs = list(iter_stdlib_docs(["json"], max_bytes=50_000))
    >>> pairs = build_instruction_pairs(max_records=100)
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.core.errors import DataError

CONTENT_TYPE = "text/x-python-docstring"

# Packages that are test suites, GUI demos, installers or data tables rather than documented APIs.
_SKIP_MODULES = frozenset({
    "__phello__", "antigravity", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "test", "this",
    "tkinter", "turtle", "turtledemo",
})
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})

# Documents stay well below curation's default max_chars (20k) so none is dropped for length.
MAX_DOC_CHARS = 8_000
_MAX_SUMMARY_CHARS = 200
_SENTENCE_END = re.compile(r"^(.+?[.!?])(?:\s|$)")
_LOOKS_LIKE_SIGNATURE = re.compile(r"^[\w.]+\(")


@dataclass(frozen=True)
class DocEntry:
    """One documented object: a module, a class, a function or a method."""

    qualname: str  # "json.dumps"
    kind: str  # "module" | "class" | "function" | "method"
    signature: str  # "json.dumps(obj, *, skipkeys=False, ...)"
    doc: str  # cleaned docstring


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_docs(modules: list[str], max_bytes: int) -> Iterator[dict]:
    """Yield documentation documents, one per module (its docstring and functions) and per class.

    ``modules`` names top-level stdlib modules (submodules of a package come along); empty means
    every pure-Python module. Modules are visited in sorted order and the walk stops once the
    yielded text reaches ``max_bytes`` (UTF-8), so the output is a deterministic prefix.
    """
    total = 0
    for name, path in _module_files(tuple(modules)):
        for title, text in _module_documents(name, path):
            data = text.encode("utf-8")
            if total >= max_bytes:
                return
            total += len(data)
            yield {
                "id": hashlib.sha256(data).hexdigest(),
                "text": text,
                "source": "stdlib",
                "uri": f"stdlib://{title}",
                "title": title,
                "content_type": CONTENT_TYPE,
                "meta": {"module": name, "python": sys.version.split()[0]},
            }


def build_instruction_pairs(max_records: int) -> list[dict]:
    """Question/answer pairs ``What does `json.dumps` do?`` → the docstring's summary sentence.

    Module-level functions and classes of top-level modules come first (the names people ask
    about), then those of submodules, then public methods; each group sorted by name. The first
    ``max_records`` unique instructions are returned.
    """
    tiers: list[list[tuple[str, str]]] = [[], [], []]
    for name, path in _module_files(()):
        for entry in _module_entries(name, path):
            if entry.kind == "module" or entry.qualname.endswith(".__init__"):
                continue  # "What does `X.__init__` do?" is not a question anyone asks
            summary = summary_line(entry.doc)
            if summary is None:
                continue
            if entry.kind == "method":
                tier = 2
            else:
                tier = 0 if "." not in name else 1
            tiers[tier].append((entry.qualname, summary))
    pairs: list[dict] = []
    seen: set[str] = set()
    for group in tiers:
        for qualname, summary in sorted(group):
            instruction = f"What does `{qualname}` do?"
            if instruction in seen:
                continue
            seen.add(instruction)
            pairs.append({
                "id": hashlib.sha256(instruction.encode("utf-8")).hexdigest(),
                "instruction": instruction,
                "response": summary,
            })
            if len(pairs) >= max_records:
                return pairs
    return pairs


def summary_line(doc: str) -> str | None:
    """The first sentence of a docstring's first paragraph, or None when it says nothing useful."""
    paragraph = doc.strip().split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    match = _SENTENCE_END.match(text)
    if match:
        text = match.group(1)
    if not (15 <= len(text) <= _MAX_SUMMARY_CHARS) or len(text.split()) < 3:
        return None
    # "dumps(obj) -> str" and "XXX fix me" are signatures or notes, not summaries.
    if _LOOKS_LIKE_SIGNATURE.match(text) or not text[0].isalpha() or not text[0].isupper():
        return None
    return text


# ---------------------------------------------------------------- walking the source tree


@functools.lru_cache(maxsize=8)
def _module_files(requested: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    """(dotted module name, source path) for every public module to read, in sorted order."""
    root = stdlib_dir()
    available = sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
    if requested:
        unknown = [n for n in requested if n not in sys.stdlib_module_names]
        if unknown:
            raise DataError(f"{', '.join(unknown)} is not a standard library module of Python "
                            f"{sys.version.split()[0]}",
                            "list top-level module names such as `json` or `email` in the stdlib "
                            "source's `modules`, or leave it empty to read every module")
        names = sorted(set(requested))
    else:
        names = [n for n in available if n not in _SKIP_MODULES]
    found: list[tuple[str, Path]] = []
    for name in names:
        found.extend(_files_of(root, name))
    if requested and not found:
        raise DataError(f"none of the stdlib modules {list(requested)} has Python source "
                        f"(modules such as `math` and `sys` are written in C)",
                        "name pure-Python modules such as `json`, `email` or `collections`")
    return tuple(found)


def _files_of(root: Path, name: str) -> list[tuple[str, Path]]:
    single = root / f"{name}.py"
    if single.is_file():
        return [(name, single)]
    package = root / name
    if not (package / "__init__.py").is_file():
        return []  # a C extension or a platform-specific module missing here
    found = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("").parts
        if any(part in _SKIP_DIRS for part in rel):
            continue
        if rel[-1] == "__init__":
            rel = rel[:-1]
        if any(part.startswith("_") for part in rel):
            continue  # private submodules document internals
        found.append((".".join(rel), path))
    return found


@functools.cache
def _module_entries(name: str, path: Path) -> tuple[DocEntry, ...]:
    """Documented public objects of one source file, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return ()  # a data file shipped with a .py suffix; nothing to document
    entries: list[DocEntry] = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        entries.append(DocEntry(name, "module", name, module_doc))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public(node.name):
            _add(entries, node, f"{name}.{node.name}", "function")
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            qualname = f"{name}.{node.name}"
            _add(entries, node, qualname, "class")
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        _public(child.name) or child.name == "__init__"):
                    _add(entries, child, f"{qualname}.{child.name}", "method")
    return tuple(entries)


def _public(name: str) -> bool:
    return not name.startswith("_")


def _add(entries: list[DocEntry], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, qualname: str,
         kind: str) -> None:
    doc = ast.get_docstring(node)
    if not doc:
        return
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        signature = f"class {qualname}({bases})" if bases else f"class {qualname}"
    else:
        signature = f"{qualname}({ast.unparse(node.args)})"
    entries.append(DocEntry(qualname, kind, signature, doc))


# ---------------------------------------------------------------- documents


def _module_documents(name: str, path: Path) -> list[tuple[str, str]]:
    """(title, text) pairs: the module's own document, then one per class with a docstring."""
    groups: list[tuple[str, list[str]]] = [(name, [])]
    for entry in _module_entries(name, path):
        block = f"{entry.signature}\n\n{entry.doc}"
        if entry.kind == "module":
            groups[0][1].append(f"Module {name}\n\n{entry.doc}")
        elif entry.kind == "function":
            groups[0][1].append(block)
        elif entry.kind == "class":
            groups.append((entry.qualname, [block]))
        elif groups[-1][0] == entry.qualname.rsplit(".", 1)[0]:
            groups[-1][1].append(block)
        # A method of an undocumented class has no class document to join; it is left out.
    documents: list[tuple[str, str]] = []
    for title, blocks in groups:
        for part, text in enumerate(_pack(blocks)):
            documents.append((title if part == 0 else f"{title}#{part + 1}", text))
    return documents


def _pack(blocks: list[str]) -> list[str]:
    """Join blocks with blank lines into texts of at most MAX_DOC_CHARS (a longer block stands alone)."""
    texts: list[str] = []
    current: list[str] = []
    size = 0
    for block in blocks:
        if current and size + len(block) + 2 > MAX_DOC_CHARS:
            texts.append("\n\n".join(current))
            current, size = [], 0
        current.append(block)
        size += len(block) + 2
    if current:
        texts.append("\n\n".join(current))
    return texts
