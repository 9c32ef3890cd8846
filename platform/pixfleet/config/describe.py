"""The typed configs as users read them: every field with its type, default and description,
taken from the pydantic models themselves, so what `pixfleet config show` prints cannot drift
from what `load_config` accepts."""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.config.evaluation import EvalJobConfig
from pixfleet.config.generation import GenerationJobConfig
from pixfleet.config.loading import ConfigError
from pixfleet.config.serving import ServingConfig
from pixfleet.config.training import TrainingJobConfig

KINDS: dict[str, type[BaseModel]] = {
    "generate": GenerationJobConfig,
    "train": TrainingJobConfig,
    "serve": ServingConfig,
    "annotate": AnnotateJobConfig,
    "eval": EvalJobConfig,
}
_BOUNDS = {
    annotated_types.Ge: (">=", "ge"),
    annotated_types.Gt: (">", "gt"),
    annotated_types.Le: ("<=", "le"),
    annotated_types.Lt: ("<", "lt"),
    annotated_types.MultipleOf: ("multiple of", "multiple_of"),
}


@dataclass(frozen=True)
class FieldDoc:
    path: str  # dotted, as `--set` takes it
    type: str
    default: str  # "required" when there is none
    description: str


def kind_of(data: dict[str, Any]) -> str:
    """Which config a YAML mapping is, from its top-level keys."""
    if "train" in data:
        return "train"
    if "models" in data:
        return "eval" if "source" in data else "serve"
    if "detector" in data:
        return "annotate"
    return "generate"


def describe(config: type[BaseModel], prefix: str = "") -> list[FieldDoc]:
    """Every field of `config`, sections (nested models) expanded into their own fields."""
    docs = []
    for name, field in config.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_model(field.annotation)
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = "(see the fields below)" if section else _render(field.default_factory())
        else:
            default = _render(field.default)
        docs.append(FieldDoc(path, _type_name(field.annotation, field.metadata), default, field.description or ""))
        if section is not None:
            docs += describe(section, f"{path}." if not _is_list(field.annotation) else f"{path}.N.")
    return docs


def show(kind: str, path: str | None = None) -> str:
    """The text of `pixfleet config show KIND [PATH]`: a field (or a section) and what is under it."""
    docs = describe(KINDS[kind])
    if path:
        docs = [d for d in docs if d.path == path or d.path.startswith(f"{path}.")]
        if not docs:
            raise ConfigError(f"{kind} config has no field {path!r}; `pixfleet config show {kind}` lists them")
    return "\n".join(f"{d.path}: {d.type} = {d.default}\n    {d.description}" for d in docs)


def _render(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value)


def _is_list(annotation: Any) -> bool:
    return get_origin(_strip(annotation)) is list


def _strip(annotation: Any) -> Any:
    """The annotation without Annotated and Optional wrappers."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _strip(members[0])
    return annotation


def _section_model(annotation: Any) -> type[BaseModel] | None:
    inner = _strip(annotation)
    if get_origin(inner) is list:
        inner = _strip(get_args(inner)[0])
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _bounds(metadata: list[Any]) -> list[str]:
    """Constraints as `>= 1`, `multiple of 8` (pydantic keeps them as annotated_types)."""
    found = []
    for item in metadata:
        items = getattr(item, "metadata", [item])  # a FieldInfo inside Annotated carries its own
        found += [f"{_BOUNDS[type(m)][0]} {getattr(m, _BOUNDS[type(m)][1])}" for m in items if type(m) in _BOUNDS]
    return found


def _type_name(annotation: Any, metadata: list[Any] = ()) -> str:
    bounds = _bounds(metadata)
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        bounds += _bounds(extra)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        name = " or ".join(_type_name(a) if a is not type(None) else "null" for a in get_args(annotation))
    elif origin is Literal:
        name = "one of " + " | ".join(str(a) for a in get_args(annotation))
    elif origin is list:
        name = f"list of {_type_name(get_args(annotation)[0])}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        name = "section"
    else:
        name = {str: "text", int: "integer", float: "number", bool: "true/false"}.get(annotation, str(annotation))
    return f"{name} ({', '.join(bounds)})" if bounds else name
