"""The one base class of every config model: frozen, and an unknown key is an error.

Every section of the pipeline config (``data``, ``training``, ``serving`` ...) and every group
inside one (``training.speed``, ``serving.kv_cache`` ...) derives from :class:`Section`, so a typo
in a YAML file fails loudly instead of silently becoming a default, and a config handed to a stage
cannot be changed under it. Field descriptions are the help text of ``lmforge config schema`` and
the form hints of the Prefect UI, where these same models are the flow's parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """A frozen config model that forbids unknown keys.

    ``moved_keys`` maps a key this section once had to where it lives now (relative to the
    section, dotted: ``{"log_every": "logging.every"}``); the loader names the new place when a
    file still holds the old key.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    moved_keys: ClassVar[Mapping[str, str]] = {}


def updated(section: S, **changes: Any) -> S:
    """A validated copy of ``section`` with ``changes``; a mapping given for a group merges into it.

    ``updated(training, logging={"every": 1}, seed=3)`` keeps every other ``logging`` field (a
    mapping given for a plain dict field, such as ``serving.adapters``, replaces it). Unlike
    ``model_copy(update=...)`` the result is validated, so a combination the config refuses fails here.
    """
    return type(section).model_validate(_merged(section, changes))


def _merged(section: Section, changes: Mapping[str, Any]) -> dict[str, Any]:
    data = section.model_dump()
    for key, value in changes.items():
        current = getattr(section, key, None) if key in type(section).model_fields else None
        data[key] = _merged(current, value) if isinstance(current, Section) and isinstance(value, Mapping) else value
    return data


def check_range(low: float, high: float, low_name: str, high_name: str) -> None:
    """Refuse a minimum above its maximum, naming both keys."""
    if low > high:
        raise ValueError(f"{low_name} ({low}) must not exceed {high_name} ({high})")
