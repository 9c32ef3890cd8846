"""Every source format yields the same canonical rows: ids, prompts, image bytes, parameters."""

from __future__ import annotations

import io
import json
import tarfile

import pandas as pd
import pytest

from pixfleet.config import ConfigError, SourceConfig
from pixfleet.generation import columns as C
from pixfleet.generation.sources import detect_format, open_source
from tests.helpers import png_bytes, random_image

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("ray_session")]

ROWS = [
    {"id": f"row-{i}", "text": f"prompt {i}", "seed": 10 + i, "edge": png_bytes(random_image(i, (16, 16)))}
    for i in range(3)
]


def _canonical(folder, fmt: str, **source) -> pd.DataFrame:
    config = SourceConfig(path=str(folder), id_column="id", control_columns=["edge"], **source)
    assert detect_format(config) == fmt
    opened = open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)
    assert opened.num_rows == len(ROWS)
    return pd.DataFrame(opened.dataset.take_all()).sort_values(C.ROW_ID).reset_index(drop=True)


def _assert_canonical(table: pd.DataFrame, with_seed: bool = True) -> None:
    assert list(table[C.ROW_ID]) == [r["id"] for r in ROWS]
    assert list(table[C.PROMPT]) == [r["text"] for r in ROWS]
    assert list(table[C.control_column(0)]) == [r["edge"] for r in ROWS]
    if with_seed:
        assert [int(s) for s in table["seed"]] == [r["seed"] for r in ROWS]


def _files_and_table(folder):
    folder.mkdir()
    for row in ROWS:
        (folder / f"{row['id']}.png").write_bytes(row["edge"])
    return pd.DataFrame([{**row, "edge": f"{row['id']}.png"} for row in ROWS])


def test_jsonl_manifest_with_relative_paths(tmp_path):
    table = _files_and_table(tmp_path / "m")
    (tmp_path / "m" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in table.to_dict("records")))
    _assert_canonical(_canonical(tmp_path / "m" / "rows.jsonl", "manifest"))


def test_csv_manifest_with_relative_paths(tmp_path):
    _files_and_table(tmp_path / "m").to_csv(tmp_path / "m" / "rows.csv", index=False)
    _assert_canonical(_canonical(tmp_path / "m" / "rows.csv", "manifest"))


def test_parquet_manifest_with_image_bytes(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "rows.parquet")
    _assert_canonical(_canonical(tmp_path / "rows.parquet", "manifest"))


def test_datasets_save_to_disk_and_datasets_parquet(tmp_path):
    import datasets

    features = datasets.Features(
        {"id": datasets.Value("string"), "text": datasets.Value("string"), "seed": datasets.Value("int64")}
        | {"edge": datasets.Image()}
    )
    records = {key: [row[key] for row in ROWS] for key in ("id", "text", "seed")}
    records["edge"] = [{"bytes": row["edge"], "path": None} for row in ROWS]
    ds = datasets.Dataset.from_dict(records, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "exported.parquet"))

    _assert_canonical(_canonical(tmp_path / "saved", "hf_dataset"))
    _assert_canonical(_canonical(tmp_path / "exported.parquet", "manifest"))


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard_index, rows in enumerate([ROWS[:2], ROWS[2:]]):
        with tarfile.open(shards / f"shard-{shard_index:05d}.tar", "w") as tar:
            for row in rows:
                for suffix, data in [
                    ("edge", row["edge"]),
                    ("json", json.dumps({"id": row["id"], "text": row["text"], "seed": row["seed"]}).encode()),
                ]:
                    info = tarfile.TarInfo(f"{row['id']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    config = SourceConfig(path=str(shards), control_columns=["edge"])
    opened = open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)
    assert opened.num_rows == 3
    table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.SOURCE_REF).reset_index(drop=True)
    assert list(table[C.SOURCE_REF]) == [r["id"] for r in ROWS]
    assert list(table[C.PROMPT]) == [r["text"] for r in ROWS]
    assert list(table[C.control_column(0)]) == [r["edge"] for r in ROWS]
    assert list(table["seed"]) == [r["seed"] for r in ROWS]


def test_folder_of_images_uses_each_image_as_control(tmp_path):
    _files_and_table(tmp_path / "imgs")
    config = SourceConfig(path=str(tmp_path / "imgs"))
    opened = open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)
    table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.SOURCE_REF).reset_index(drop=True)
    assert list(table[C.control_column(0)]) == [r["edge"] for r in ROWS]
    assert set(table[C.ROW_ID]) == {""}  # hashed from content later, once parameters are resolved


def test_a_manifest_missing_a_column_names_it(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "rows.parquet")
    config = SourceConfig(path=str(tmp_path / "rows.parquet"), id_column="key", control_columns=["edge"])
    with pytest.raises(ConfigError, match=r"rows.parquet: no column for id_column \(key\); columns are id, text"):
        open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)
