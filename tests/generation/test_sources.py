"""Every source format yields the same canonical rows: ids, prompts, image bytes, parameters."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import pandas as pd
import pytest

from pixfleet.config import ConfigError, SourceConfig
from pixfleet.engine import columns as C
from pixfleet.generation.sources import detect_format, open_source
from tests.helpers import png_bytes, random_image

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("ray_session")]

ROWS = [
    {"id": f"row-{i}", "text": f"prompt {i}", "seed": 10 + i, "edge": png_bytes(random_image(i, (16, 16)))}
    for i in range(3)
]


def _canonical(folder, fmt: str, counted: bool = True) -> pd.DataFrame:
    """`counted`: the format has the row count without reading the rows (parquet footers, JSON
    lines counted as the file is cut into chunks); for CSV and Arrow files the total is unknown."""
    config = SourceConfig(path=str(folder), id_column="id", control_columns=["edge"])
    assert detect_format(config) == fmt
    opened = open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)
    assert opened.num_rows == (len(ROWS) if counted else None)
    table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.ROW_ID).reset_index(drop=True)
    assert len(table) == len(ROWS)
    return table


def _assert_canonical(table: pd.DataFrame, cells_are_text: bool = False) -> None:
    """`cells_are_text`: a CSV's cells stay text; parameters parse them when rows are resolved."""
    assert list(table[C.ROW_ID]) == [r["id"] for r in ROWS]
    own = [json.loads(params) for params in table[C.ROW_PARAMS]]
    cast = str if cells_are_text else int
    assert own == [{"prompt": r["text"], "seed": cast(r["seed"])} for r in ROWS]
    assert list(table[C.control_column(0)]) == [r["edge"] for r in ROWS]
    assert set(table[C.LOAD_ERRORS]) == {"{}"}


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
    _assert_canonical(_canonical(tmp_path / "m" / "rows.csv", "manifest", counted=False), cells_are_text=True)


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

    _assert_canonical(_canonical(tmp_path / "saved", "hf_dataset", counted=False))
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
    assert opened.num_rows is None  # the driver reads no shard through: counted as they are read
    table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.SOURCE_REF).reset_index(drop=True)
    assert list(table[C.SOURCE_REF]) == [r["id"] for r in ROWS]
    own = [json.loads(params) for params in table[C.ROW_PARAMS]]
    assert own == [{"prompt": r["text"], "seed": r["seed"]} for r in ROWS]
    assert list(table[C.control_column(0)]) == [r["edge"] for r in ROWS]


def test_folder_of_images_uses_each_image_as_control_or_as_the_image_to_edit(tmp_path):
    _files_and_table(tmp_path / "imgs")
    config = SourceConfig(path=str(tmp_path / "imgs"))
    for task, controlnets, column in (("controlnet", 1, C.control_column(0)), ("pix2pix", 0, C.SOURCE_IMAGE)):
        opened = open_source(config, task, num_controlnets=controlnets, rows_per_block=2)
        table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.SOURCE_REF).reset_index(drop=True)
        assert list(table[column]) == [r["edge"] for r in ROWS]
        assert set(table[C.ROW_ID]) == {""}  # hashed from content later, once parameters are resolved


def test_a_manifest_missing_a_column_names_it(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "rows.parquet")
    config = SourceConfig(path=str(tmp_path / "rows.parquet"), id_column="key", control_columns=["edge"])
    with pytest.raises(ConfigError, match=r"rows.parquet: no column for id_column \(key\); columns are id, text"):
        open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)


HUGE_SEEDS = [4611686018427387907, 4611686018427387913, None, 4611686018427387919]


def _sparse_rows(folder):
    """Rows whose parameter cells are set on some rows only, with seeds over 2**53."""
    folder.mkdir()
    rows = []
    for i, seed in enumerate(HUGE_SEEDS):
        (folder / f"{i}.png").write_bytes(png_bytes(random_image(i, (16, 16))))
        rows.append(
            {
                "edge": f"{i}.png",
                "text": f"prompt {i}" if i != 1 else None,
                "seed": seed,
                "num_inference_steps": 3 if i == 0 else None,
                "controlnet_conditioning_scale": 0.5 if i == 3 else None,
            }
        )
    return rows


def _own_params(path) -> list[dict]:
    config = SourceConfig(path=str(path), control_columns=["edge"])
    opened = open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)
    table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.SOURCE_REF).reset_index(drop=True)
    return [json.loads(params) for params in table[C.ROW_PARAMS]]


EXPECTED_SPARSE = [
    {"prompt": "prompt 0", "seed": HUGE_SEEDS[0], "num_inference_steps": 3},
    {"seed": HUGE_SEEDS[1]},
    {"prompt": "prompt 2"},
    {"prompt": "prompt 3", "seed": HUGE_SEEDS[3], "controlnet_conditioning_scale": 0.5},
]


def test_sparse_jsonl_cells_are_unset_and_huge_seeds_stay_exact(tmp_path):
    rows = _sparse_rows(tmp_path / "m")
    (tmp_path / "m" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert _own_params(tmp_path / "m" / "rows.jsonl") == EXPECTED_SPARSE


def test_sparse_csv_cells_are_unset_and_huge_seeds_stay_exact(tmp_path):
    rows = _sparse_rows(tmp_path / "m")
    pd.DataFrame(rows).to_csv(tmp_path / "m" / "rows.csv", index=False)
    with (tmp_path / "m" / "rows.csv").open("w", newline="") as f:  # as a spreadsheet writes it: gaps empty
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    own = _own_params(tmp_path / "m" / "rows.csv")
    # CSV cells are text: parameters parse them ("3" -> 3) when the row is resolved.
    assert own == [{k: str(v) for k, v in row.items()} for row in EXPECTED_SPARSE]


def test_sparse_parquet_cells_are_unset_and_huge_seeds_stay_exact(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _sparse_rows(tmp_path / "m")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m" / "rows.parquet")
    assert _own_params(tmp_path / "m" / "rows.parquet") == EXPECTED_SPARSE


def test_a_parameter_column_the_task_does_not_take_is_refused_up_front(tmp_path):
    table = _files_and_table(tmp_path / "m").assign(strength=0.5)
    table.to_parquet(tmp_path / "m" / "rows.parquet")
    config = SourceConfig(path=str(tmp_path / "m" / "rows.parquet"), control_columns=["edge"])
    with pytest.raises(ConfigError, match=r"column 'strength' is a parameter task 'controlnet' does not take"):
        open_source(config, "controlnet", num_controlnets=1, rows_per_block=2)


def test_unreadable_image_cells_say_why(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "dir.png").mkdir()
    rows = [{"edge": "loop.png"}, {"edge": "dir.png"}, {"edge": "gone.png"}, {"edge": None}]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = SourceConfig(path=str(folder / "rows.jsonl"), control_columns=["edge"])
    opened = open_source(config, "controlnet", num_controlnets=1, rows_per_block=4)
    table = pd.DataFrame(opened.dataset.take_all()).sort_values(C.SOURCE_REF).reset_index(drop=True)
    reasons = [json.loads(errors)[C.control_column(0)] for errors in table[C.LOAD_ERRORS]]
    assert "cannot read (Too many levels of symbolic links)" in reasons[0]
    assert reasons[1].endswith("dir.png is a folder, not a file")
    assert reasons[2].endswith("gone.png: no such file")
    assert reasons[3] == "no image in this row (empty cell)"
    assert opened.image_labels == {C.control_column(0): "edge"}


def test_an_image_source_reads_a_manifest_without_a_task(fill50k_dir):
    # annotate's photos and eval's FID targets: one image column, no generation parameters
    from pixfleet.generation.sources import open_image_source

    source = open_image_source(SourceConfig(path=str(fill50k_dir), source_image_column="image"), 4)
    rows = source.dataset.take_all()
    assert source.num_rows == len(rows) == 16
    assert all(row[C.SOURCE_IMAGE][:8] == b"\x89PNG\r\n\x1a\n" for row in rows)
