"""Models from the MLflow registry (`models:/NAME@ALIAS`, `runs:/ID/path`) or object storage
(`s3://bucket/models/sd15`) to a local folder, fetched once per node."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from pixfleet.config import ModelSpec
from pixfleet.config.paths import is_mlflow_uri
from pixfleet.errors import UserError
from pixfleet.storage import Location, StorageError, is_uri

CACHE = Path.home() / ".cache" / "pixfleet" / "mlflow"


class RegistryError(UserError, RuntimeError):
    """An MLflow model URI that does not resolve."""


def resolve_version(reference: str, tracking_uri: str) -> tuple[str, str]:
    """`[models:/]NAME@ALIAS` or `[models:/]NAME/VERSION` -> (NAME, VERSION) as the registry
    says now (an alias moves, so it is resolved each time); RegistryError naming `reference`."""
    import mlflow

    name, at, alias = reference.removeprefix("models:/").partition("@")
    if not at:
        name, _, alias = name.partition("/")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        version = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, alias)
    except Exception as error:
        raise RegistryError(f"{reference}: cannot resolve in MLflow at {tracking_uri} ({error})") from None
    return name, str(version.version)


def download_model(uri: str, tracking_uri: str) -> str:
    """The local folder of `uri`'s artifacts, downloaded once per resolved version."""
    import mlflow

    try:
        if uri.startswith("models:/"):
            name, version = resolve_version(uri, tracking_uri)
            key = f"{tracking_uri}|{name}|{version}"
            source = f"models:/{name}/{version}"
        else:
            key, source = f"{tracking_uri}|{uri}", uri
        folder = CACHE / hashlib.sha256(key.encode()).hexdigest()[:16]
        if not folder.exists():
            _download(mlflow, source, tracking_uri, folder)
    except RegistryError:
        raise
    except Exception as error:
        raise RegistryError(f"{uri}: cannot resolve in MLflow at {tracking_uri} ({error})") from None
    return str(folder)


def _download(mlflow, source: str, tracking_uri: str, folder: Path) -> None:
    """Download into a private staging folder, then rename: replicas starting together on one
    node may fetch the same version at once, and the first rename wins."""
    CACHE.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix=f"{folder.name}."))
    try:
        mlflow.set_tracking_uri(tracking_uri)
        downloaded = mlflow.artifacts.download_artifacts(source, dst_path=str(staging))
        try:
            Path(downloaded).rename(folder)
        except OSError:
            if not folder.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pin_version(uri: str | None, tracking_uri: str) -> str | None:
    """`models:/NAME@ALIAS` -> `models:/NAME/VERSION` as the registry says now, other values as
    they are: the workers of one job then load the same version, even if the alias moves."""
    if not uri or not uri.startswith("models:/"):
        return uri
    name, version = resolve_version(uri, tracking_uri)
    return f"models:/{name}/{version}"


def local_model(value: str | None, tracking_uri: str) -> str | None:
    """The folder to load `value` from: an MLflow URI or a folder in object storage downloaded
    (once per node), else as it is (a local folder or a hub id)."""
    if value and is_mlflow_uri(value):
        return download_model(value, tracking_uri)
    if value and is_uri(value):
        try:
            return str(Location.of(value).cached_copy())
        except StorageError as error:
            raise RegistryError(str(error)) from None
    return value


def resolve_registry_models(spec: ModelSpec, tracking_uri: str) -> ModelSpec:
    """`spec` with every MLflow URI replaced by its downloaded folder (object storage URIs stay:
    each node fetches those itself, `folders.fetch_model_files`)."""

    def resolved(value: str) -> str:
        return download_model(value, tracking_uri) if is_mlflow_uri(value) else value

    return spec.model_copy(
        update={"base_model": resolved(spec.base_model), "controlnets": [resolved(c) for c in spec.controlnets]}
    )
