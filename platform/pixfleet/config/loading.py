"""Read a YAML file into a typed config, with `--set a.b=c` overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot work; the message names the file and the field."""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `dotted.key=value` in `data`; values are parsed as YAML (`3`, `true`, `[1, 2]`)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected key=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line per problem: `file: field 'a.b': message`."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<root>"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{source}: field '{field}': {message}")
    return "\n".join(lines)


def validate_config(cls: type[ConfigT], data: dict, source: str) -> ConfigT:
    """Validate `data` into `cls`, turning pydantic's report into a ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error)) from None


def load_config(cls: type[ConfigT], path: str | Path, overrides: list[str] = ()) -> ConfigT:
    """Load `path` (YAML) into `cls`, after applying `overrides`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return validate_config(cls, read_config_data(path.read_text(), str(path), overrides), str(path))


def read_config_data(text: str, source: str, overrides: list[str] = ()) -> dict:
    """YAML text -> a mapping with `overrides` applied, not yet validated."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return apply_overrides(data, list(overrides))
