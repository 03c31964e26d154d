"""Read a YAML config file that may be careless or hostile, into plain Python values, safely and fast.

A config file is small, so anything that makes it big is refused before it costs time or memory:
a file over :data:`MAX_BYTES`, nesting deeper than :data:`MAX_DEPTH`, and anchors and aliases that
expand to more than :data:`MAX_VALUES` values (a "billion laughs" file is a few hundred bytes that
expand to 10^9 strings: PyYAML shares the repeated objects, but validating or printing them walks
every copy). A duplicate key is an error naming both lines (PyYAML keeps the last one silently), and
a file that is not UTF-8 is named with the spot and the fix. Every refusal is a :class:`ConfigError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from lmforge.core.errors import ConfigError

MAX_BYTES = 1 << 20  # the shipped configs are a few KiB; a MiB is room for long source lists
MAX_DEPTH = 64  # the deepest config key is five levels down
MAX_VALUES = 100_000  # scalars, lists and mappings after every alias is expanded

_MERGE_TAG = "tag:yaml.org,2002:merge"
_ANCHORS_FIX = ("write the values out, or use fewer anchors (&name) and aliases (*name): a config holds "
                "at most a few thousand values")


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of sections in the YAML file ``path`` ({} for an empty file)."""
    data = parse_yaml(read_text(path), f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}",
                          "write sections such as `training:` and `model:` at the top level")
    return data


def parse_yaml(text: str, where: str) -> Any:
    """The one YAML document in ``text`` (read from ``where``, a name for errors), within the limits above."""
    loader = None
    try:
        loader = _ConfigLoader(text, where)  # PyYAML's reader already refuses control characters here
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(f"{where} is not valid YAML{at}: {shorten(str(problem))}",
                          "fix the YAML syntax (indentation, colons, quotes) at that spot") from None
    except (ValueError, OverflowError) as exc:  # a scalar PyYAML cannot build: a 5000-digit int, month 13
        raise ConfigError(f"{where} holds a value YAML cannot read: {shorten(str(exc))}",
                          "write numbers and dates in their usual short form") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: Path) -> str:
    """A config file's text: at most MAX_BYTES, UTF-8 (a byte-order mark allowed), errors naming the fix."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          "pass an existing YAML file, e.g. configs/default.yaml, or omit it to use the defaults") \
            from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is not a file but a directory",
                          "pass a YAML file, e.g. configs/default.yaml") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}",
                          "check the path and its permissions") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_BYTES >> 20} MiB, far beyond any config",
                          "pass the pipeline config (a few KiB of YAML); keep data in the data sources it names")
    try:
        return data.decode("utf-8-sig")  # a byte-order mark some editors write is not content
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line})",
                          "save the file as UTF-8 (your editor's encoding setting, or "
                          "`iconv -f latin1 -t utf-8 OLD > NEW`)") from None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that bounds depth and alias expansion and refuses duplicate keys."""

    def __init__(self, text: str, where: str) -> None:
        super().__init__(text)
        self.where = where
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # PyYAML composes recursively: bounding depth here keeps `[` x 100,000 from a RecursionError.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.where} is nested more than {MAX_DEPTH} levels deep (at line {line})",
                                  "a config is a few levels of sections and keys: remove the extra nesting")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_document(self) -> Node:
        node = super().compose_document()
        _expanded_size(node, 0, {}, set(), self.where)
        return node

    def compose_mapping_node(self, anchor: str | None) -> Node:
        node = super().compose_mapping_node(anchor)
        # Checked on the composed node, before merge keys (`<<: *base`) are flattened: a key given
        # here may override a merged one, but the same key twice is a mistake.
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key.value, str) or key.tag == _MERGE_TAG:
                continue
            line = key.start_mark.line + 1
            seen = first.setdefault((key.tag, key.value), line)
            if seen != line:
                raise ConfigError(f"{self.where} has the duplicate key {shorten(key.value)!r} at line {line} "
                                  f"(first at line {seen})", "keep one of them: YAML would silently use the last")
        return node


def _expanded_size(node: Node, depth: int, sizes: dict[int, tuple[int, int]], open_: set[int], where: str) -> \
        tuple[int, int]:
    """(values, height) of ``node`` with every alias expanded; refuses cycles, bombs and deep nests.

    Memoized per node, so it costs one visit per written node however often aliases repeat it.
    """
    key = id(node)
    if key in open_:
        raise ConfigError(f"{where} holds a recursive alias (a *name inside its own &name value, line "
                          f"{node.start_mark.line + 1})", "write the value out instead of referring to itself")
    if key not in sizes:
        open_.add(key)
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size, height = 1, 0
        for child in children:
            child_size, child_height = _expanded_size(child, depth + 1, sizes, open_, where)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_VALUES:
                raise ConfigError(f"{where} expands to more than {MAX_VALUES:,} values through its anchors and "
                                  f"aliases (a 'billion laughs' file?)", _ANCHORS_FIX)
        open_.discard(key)
        sizes[key] = (size, height)
    if depth + sizes[key][1] > MAX_DEPTH:
        raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep once its aliases are expanded",
                          "a config is a few levels of sections and keys: remove the extra nesting")
    return sizes[key]


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: error messages quote user input."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
