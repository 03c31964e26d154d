"""The one base class of every config model: frozen, and an unknown key is an error.

Every section of the pipeline config (``data``, ``training``, ``serving`` ...) and every group
inside one (``training.speed``, ``serving.kv_cache`` ...) derives from :class:`Section`, so a typo
in a YAML file fails loudly instead of silently becoming a default, and a config handed to a stage
cannot be changed under it. Field descriptions are the help text of ``lmforge config schema`` and
the form hints of the Prefect UI, where these same models are the flow's parameters.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """A frozen config model that forbids unknown keys, infinities and NaNs, and floats for integers.

    ``moved_keys`` maps a key this section once had to where it lives now (relative to the
    section, dotted: ``{"log_every": "logging.every"}``); the loader names the new place when a
    file still holds the old key.

    A group given as a mapping is merged over the group's own default, so a partial block keeps
    every key it does not list (``training: {pretrain: {steps: 5}}`` keeps the pretraining phase's
    learning rate and sequence length, which differ from the fine-tuning phase's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    moved_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _partial_groups_keep_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        merged = dict(data)
        for name, field in cls.model_fields.items():
            kind, given = field.annotation, data.get(name)
            if field.default_factory is None or not isinstance(given, Mapping) or \
                    not (isinstance(kind, type) and issubclass(kind, Section)):
                continue
            # Only the keys where the factory differs from the group's class defaults: those the class
            # fills in itself, and a full dump would clash with a legacy key the mapping may hold.
            default = field.get_default(call_default_factory=True, validated_data={}).model_dump(exclude_defaults=True)
            merged[name] = {**default, **given}
        return merged

    @model_validator(mode="before")
    @classmethod
    def _no_float_for_int(cls, data: Any) -> Any:
        # pydantic takes 1e20 or 5.0 for an int field; from a config file either is a mistake. (A
        # model validator: a field validator for "*" would also wrap the sources' discriminator.)
        if not isinstance(data, Mapping):
            return data
        wrong = [InitErrorDetails(type=PydanticCustomError(
                     "int_from_float", "expected a whole number, got {value}: write it as an integer (5, not 5.0 or "
                     "1e5)", {"value": repr(value)}), loc=(name,), input=value)
                 for name, field in cls.model_fields.items()
                 if isinstance(value := data.get(name), float) and _wants_int(field.annotation)]
        if wrong:
            raise ValidationError.from_exception_data(cls.__name__, wrong)
        return data


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


def _wants_int(kind: Any) -> bool:
    """Whether a field of type ``kind`` takes integers and no floats (int, int | None)."""
    if get_origin(kind) in (Union, types.UnionType):
        options = get_args(kind)
        return int in options and float not in options
    return kind is int


def check_range(low: float, high: float, low_name: str, high_name: str) -> None:
    """Refuse a minimum above its maximum, naming both keys."""
    if low > high:
        raise ValueError(f"{low_name} ({low}) must not exceed {high_name} ({high})")
