"""MLflow registry URIs -> local folders: cached per resolved version, safe to fetch at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pixfleet.models import registry
from tests.helpers import register_controlnet


@pytest.fixture
def registered(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(registry, "CACHE", tmp_path / "cache")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    register_controlnet(tiny_dir / "controlnet" / "controlnet", "cn", uri, tmp_path / "artifacts")
    return uri


def test_replicas_fetching_one_version_at_once_share_one_folder(registered, tmp_path):
    with ThreadPoolExecutor(4) as pool:
        folders = set(pool.map(lambda _: registry.download_model("models:/cn@champion", registered), range(4)))
    assert len(folders) == 1
    folder = folders.pop()
    assert (tmp_path / "cache" / folder.rsplit("/", 1)[1] / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.rsplit("/", 1)[1]]  # no staging left
    assert registry.download_model("models:/cn/1", registered) == folder


def test_an_unknown_alias_names_the_uri(registered):
    with pytest.raises(registry.RegistryError, match=r"models:/cn@nope: cannot resolve in MLflow"):
        registry.download_model("models:/cn@nope", registered)
