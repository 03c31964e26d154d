"""``response_format`` in a request (completions and chat), as OpenAI's API defines it.

``{"type": "text"}`` is no constraint; ``{"type": "json_object"}`` any JSON object;
``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`` JSON that
follows the schema. The schema itself is checked and compiled by the engine
(``engine/structured.py``), which answers 400 naming ``response_format`` for one it cannot enforce.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmforge.serving.engine.sampling import ResponseFormat


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's shape. The output always follows the schema, whatever
    ``strict`` says (a schema the grammar cannot enforce is refused instead)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None  # never echoed or decoded: any string will do
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="A JSON Schema object.")
    strict: bool | None = None


class ResponseFormatRequest(BaseModel):
    """``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormatRequest:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format: type json_schema needs json_schema.schema, a JSON Schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"response_format: json_schema is given but type is {self.type!r}; send type json_schema")
        return self

    def spec(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema is not None else None
        return ResponseFormat(self.type, json.dumps(schema) if schema is not None else None)
