"""Read a YAML file into a typed config, with `--set a.b=c` overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from pixfleet.errors import UserError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A config that cannot work; the message names the file and the field."""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `dotted.key=value` in `data`; values are parsed as YAML (`3`, `true`, `[1, 2]`).

    A number in the path indexes a list (`models.0.num_gpus=1`); one past the end appends
    (`model.controlnets.1=./depth`). A library for this (OmegaConf) would also read `${...}`
    in any value, prompts included, as an interpolation, so overrides stay this small loop.
    """
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {override!r}: expected key=value")
        *parents, leaf = key.split(".")
        node = data
        for depth, part in enumerate(parents):
            node = _child(node, part, parents[depth + 1] if depth + 1 < len(parents) else leaf, override)
        _assign(node, leaf, yaml.safe_load(raw), override)
    return data


def _child(node: dict | list, part: str, next_part: str, override: str) -> dict | list:
    """The section `part` of `node`, created (as a list when the next part is a number) if absent."""
    empty = [] if next_part.isdigit() else {}
    if isinstance(node, list):
        index = _index(node, part, override, appending=True)
        if index == len(node):
            node.append(empty)
        child = node[index]
    elif isinstance(node, dict):
        if node.get(part) is None:
            node[part] = empty
        child = node[part]
    else:
        raise ConfigError(f"--set {override!r}: {part!r} is not a section")
    if not isinstance(child, dict | list):
        raise ConfigError(f"--set {override!r}: {part!r} is not a section")
    return child


def _assign(node: dict | list, leaf: str, value: Any, override: str) -> None:
    if isinstance(node, list):
        index = _index(node, leaf, override, appending=True)
        node[index : index + 1] = [value]
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ConfigError(f"--set {override!r}: {leaf!r} is not in a section")


def _index(items: list, part: str, override: str, appending: bool) -> int:
    if not part.isdigit() or int(part) > len(items) - (0 if appending else 1):
        allowed = f"0 to {len(items) - 1}, or " if items else ""
        raise ConfigError(
            f"--set {override!r}: {part!r} is not an index of the list ({allowed}{len(items)} to add an item)"
        )
    return int(part)


def describe_errors(errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """pydantic's error list as (dotted field, message) pairs.

    A value that fails every branch of a union (a number, or a list of them) is reported once,
    by the branch that got furthest; branch names (`list[float]`) are not fields and are left out.
    """
    described: dict[tuple, tuple[int, str, str]] = {}
    for item in errors:
        loc = item["loc"]
        branch = next((i for i, part in enumerate(loc) if _is_union_branch(part)), len(loc))
        field = ".".join(str(part) for part in loc if not _is_union_branch(part))
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        depth = len(loc) - (1 if item["type"].endswith("_type") else 0)  # a type mismatch got least far
        key = loc[:branch]
        if key not in described or depth > described[key][0]:
            described[key] = (depth, field, message)
    return [(field, message) for _, field, message in described.values()]


def _is_union_branch(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith(_TAG_PREFIXES))


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "bytes"}
_TAG_PREFIXES = ("constrained-", "function-")


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line per problem: `file: field 'a.b': message` (or `file: message` for the whole)."""
    return "\n".join(
        f"{source}: field '{field}': {message}" if field else f"{source}: {message}"
        for field, message in describe_errors(error.errors())
    )


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
