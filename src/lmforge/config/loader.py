"""Read a YAML config file into a :class:`PipelineConfig`, with errors that name key and file.

An unknown key is an error; a key that an older version of lmforge had at another place (a flat
``training.log_every``, now ``training.logging.every``) gets its new place named in the fix, from the
``moved_keys`` of the section that lost it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from lmforge.config.base import Section
from lmforge.config.pipeline import PipelineConfig
from lmforge.core.errors import ConfigError

# Discriminated-union tags pydantic puts into error locations; they are noise for a user.
SOURCE_TAGS = ("stdlib", "local", "web", "feed", "s3", "hf")

S = TypeVar("S", bound=Section)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load ``path`` (or the embedded defaults when None). Missing sections take their defaults."""
    raw: dict[str, Any] = {}
    where = "the built-in defaults"
    if path is not None:
        where = str(path)
        raw = _read_yaml(Path(path))
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
    section: type[Section] = model
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(part, str) else None
        kind = field.annotation if field is not None else None
        if not (isinstance(kind, type) and issubclass(kind, Section)):
            return None
        section = kind
    new = section.moved_keys.get(str(loc[-1]))
    return ".".join([*map(str, loc[:-1]), new]) if new else None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist",
                          "pass an existing YAML file, e.g. configs/default.yaml, or omit it to use the defaults")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}",
                          "fix the YAML syntax (indentation, colons, quotes) at that spot") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}",
                          "write sections such as `training:` and `model:` at the top level")
    return data


def _describe(exc: ValidationError, model: type[Section]) -> tuple[list[str], list[tuple[str, str]]]:
    """One line per error, and (old key, new key) for each unknown key that moved."""
    lines, moves = [], []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p not in SOURCE_TAGS]
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            new = moved_key(model, loc)
            lines.append(f"unknown key '{key}'" + (f" (moved to '{new}')" if new else ""))
            if new:
                moves.append((key, new))
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            value = err.get("input")
            shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
            lines.append(f"invalid value for '{key}'{shown}: {err['msg']}")
    return lines, moves


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
