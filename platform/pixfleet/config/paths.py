"""Tell local paths from hub ids and URIs (MLflow models, object storage), and check that local
ones exist; a URI is checked where it is read."""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator

from pixfleet.storage import is_uri

# `org/name` or `name`: what `from_pretrained` looks up on the hub when no such folder exists.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# MLflow model URIs: a registered version or alias, or a run's artifact folder.
MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(value: str) -> bool:
    return value.startswith(MLFLOW_SCHEMES)


def looks_local(value: str) -> bool:
    """True for a path meant as local: it exists, or it is written like a path, not a hub id or URI."""
    if is_mlflow_uri(value) or is_uri(value):
        return False
    return os.path.exists(os.path.expanduser(value)) or not _HUB_ID.match(value)


def require_existing(value: str) -> str:
    """Return `value` if it is a hub id or an existing path; raise naming it otherwise."""
    if looks_local(value) and not os.path.exists(os.path.expanduser(value)):
        raise ValueError(f"path does not exist: {value}")
    return value


ModelOrPath = Annotated[str, AfterValidator(require_existing)]
"""A hub id, an MLflow model URI (`models:/NAME@ALIAS`), a folder in object storage
(`s3://bucket/models/sd15`), or a local path that must exist."""


def require_local(value: str) -> str:
    """Return `value` if it is an existing local path or a remote URI (s3://...)."""
    if not is_uri(value) and not os.path.exists(os.path.expanduser(value)):
        raise ValueError(f"path does not exist: {value}")
    return value


ExistingPath = Annotated[str, AfterValidator(require_local)]
"""A local file or folder that must exist, or a remote URI checked where it is read."""
