"""MkDocs hook: the config reference page's table, generated from the schema in vs2ray/config.py at build time."""

from __future__ import annotations

import json
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PLACEHOLDER = "<!-- config-reference -->"


def _kind(field: FieldInfo) -> str:
    """A field's allowed values in words: the Literal's values, the type, or 'searchable'."""
    from vs2ray.config import Searchable

    searchable = [meta for meta in field.metadata if isinstance(meta, Searchable)]
    if searchable:
        return "searchable: " + searchable[0].describe().replace("|", "\\|")
    annotation = field.annotation
    literals = _literals(annotation)
    if literals:
        return " \\| ".join(f"`{value}`" for value in literals)
    text = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return text.replace("|", "\\|")


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    values: list[Any] = []
    for arg in typing.get_args(annotation):
        values += _literals(arg)
    return values


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return ""
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value, default=str)}`"


def config_table() -> str:
    """Every key of ExperimentConfig: | key | default | allowed values | meaning |, one bold row per section."""
    from vs2ray.config import ExperimentConfig

    rows = ["| key | default | allowed values | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = prefix + (field.alias or name)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                rows.append(f"| **{key}** | | | |")
                walk(annotation, key + ".")
                continue
            description = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {_default(field)} | {_kind(field)} | {description} |")

    walk(ExperimentConfig, "")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **_: Any) -> str:
    return markdown.replace(PLACEHOLDER, config_table()) if PLACEHOLDER in markdown else markdown
