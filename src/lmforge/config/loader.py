"""Read a YAML config file into a :class:`PipelineConfig`, with errors that name key and file.

An unknown key is an error; a key that an older version of lmforge had at another place (a flat
``training.log_every``, now ``training.logging.every``) gets its new place named in the fix, from the
``moved_keys`` of the section that lost it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from lmforge.config.base import Section
from lmforge.config.pipeline import PipelineConfig
from lmforge.config.yaml_file import read_config_file, shorten
from lmforge.core.errors import ConfigError

# Discriminated-union tags pydantic puts into error locations; they are noise for a user.
SOURCE_TAGS = ("stdlib", "local", "web", "feed", "s3", "hf")
# Errors of a bounded field, which get the field's allowed range appended.
BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
# A hostile file can hold thousands of bad keys; the first ones are enough to act on.
MAX_PROBLEMS = 20

S = TypeVar("S", bound=Section)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load ``path`` (or the embedded defaults when None). Missing sections take their defaults."""
    raw: dict[str, Any] = {}
    where = "the built-in defaults"
    if path is not None:
        where = str(path)
        raw = read_config_file(Path(path))
    if overrides:
        raw = _deep_merge(raw, overrides)
    return parse_config(raw, where)


def parse_config(raw: dict[str, Any], where: str = "the config") -> PipelineConfig:
    """Validate a whole pipeline config read from ``where`` (a file name, for the error)."""
    return parse_section(PipelineConfig, raw, where)


def parse_section(model: type[S], raw: Any, where: str) -> S:
    """Validate ``raw`` as ``model`` (the pipeline, or one section read alone, as a serving-config file is).

    Raises :class:`ConfigError` listing every bad key of ``where``; keys that moved get their new place.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems, moves = _describe(exc, model)
        fix = f"correct the listed key(s) in {where}; `lmforge config schema` lists every key and its allowed values"
        if moves:
            moved = "; ".join(f"{old} is now {new}" for old, new in moves)
            others = len(problems) > len(moves)
            fix = f"{moved} (move {'them' if len(moves) > 1 else 'it'} there in {where})" + (
                f"; {fix.replace('listed', 'other listed')}" if others else "")
        raise ConfigError(f"{where}: " + "; ".join(problems), fix) from None


def moved_key(model: type[Section], loc: list[str | int]) -> str | None:
    """Where the unknown key at ``loc`` (inside ``model``) lives now, dotted, or None if it never moved."""
    section = _section_at(model, loc[:-1])
    new = section.moved_keys.get(str(loc[-1])) if section else None
    return ".".join([*map(str, loc[:-1]), new]) if new else None


def _section_at(model: type[Section], loc: list[str | int]) -> type[Section] | None:
    """The group at ``loc`` inside ``model``, or None where the path leaves the groups (a list, a dict)."""
    section: type[Section] = model
    for part in loc:
        field = section.model_fields.get(part) if isinstance(part, str) else None
        kind = field.annotation if field is not None else None
        if not (isinstance(kind, type) and issubclass(kind, Section)):
            return None
        section = kind
    return section


def _describe(exc: ValidationError, model: type[Section]) -> tuple[list[str], list[tuple[str, str]]]:
    """One line per error (the first MAX_PROBLEMS), and (old key, new key) for each unknown key that moved.

    Keys, values and messages are shortened: a hostile file's value may be megabytes long.
    """
    lines, moves = [], []
    errors = exc.errors()
    for err in errors[:MAX_PROBLEMS]:
        # A union's tag follows a list index (data.sources.0.local.paths); elsewhere it is a user's key.
        loc = [p for i, p in enumerate(err["loc"]) if not (p in SOURCE_TAGS and i and isinstance(err["loc"][i - 1], int))]
        key = shorten(".".join(str(p) for p in loc))
        if err["type"] == "extra_forbidden":
            new = moved_key(model, loc)
            lines.append(f"unknown key '{key}'" + (f" (moved to '{new}')" if new else ""))
            if new:
                moves.append((key, new))
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            value = err.get("input")
            shown = f" (got {shorten(repr(value))})" if value is not None and not isinstance(value, dict) else ""
            section = _section_at(model, loc[:-1]) if loc else None
            field = section.model_fields.get(str(loc[-1])) if section else None
            allowed = f" (allowed: {_allowed(field)})" if field and err["type"] in BOUND_ERRORS else ""
            lines.append(f"invalid value for '{key}'{shown}: {shorten(err['msg'], 300)}{allowed}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"and {len(errors) - MAX_PROBLEMS} more")
    return lines, moves


def _allowed(field: FieldInfo) -> str:
    """A field's bounds in words: 'from 1 to 1024', 'above 0, at most 1', 'at least 0'."""
    bounds = {type(m).__name__: getattr(m, type(m).__name__.lower()) for m in field.metadata
              if type(m).__name__ in ("Ge", "Gt", "Le", "Lt")}
    if "Ge" in bounds and "Le" in bounds:
        return f"from {bounds['Ge']:,} to {bounds['Le']:,}"
    words = {"Ge": "at least", "Gt": "above", "Le": "at most", "Lt": "below"}
    return ", ".join(f"{words[name]} {bound:,}" for name, bound in bounds.items())


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
