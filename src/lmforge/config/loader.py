"""Read a YAML config file into a :class:`PipelineConfig`, with errors that name key and file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmforge.config.stages import PipelineConfig
from lmforge.core.errors import ConfigError

# Discriminated-union tags pydantic puts into error locations; they are noise for a user.
SOURCE_TAGS = ("stdlib", "local", "web", "feed", "s3", "hf")


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
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, where), f"correct the listed key(s) in {where}; "
                          "`lmforge config schema` lists every key and its allowed values") from None


def config_hash(config: PipelineConfig) -> str:
    """Stable digest of a resolved config, recorded as lineage on every run."""
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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


def _describe(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p not in SOURCE_TAGS)
        if err["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            value = err.get("input")
            shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
            lines.append(f"invalid value for '{key}'{shown}: {err['msg']}")
    return f"{where}: " + "; ".join(lines)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
