"""Tables planned on the driver and read by chunk: JSON lines keep their line numbers across
chunks, counts come without reading rows, a bad line is a row's error, not the table's."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pixfleet.config import ConfigError
from pixfleet.data import tables
from pixfleet.data.tables import ROW, ROW_ERROR, RowLocator, plan_table, read_chunk
from pixfleet.storage import Location

COLUMNS = {"image_column": "image", "caption_column": "text"}


def test_json_lines_cut_into_chunks_keep_their_line_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "JSONL_CHUNK_BYTES", 200)  # many chunks from a small file
    lines = [json.dumps({"image": f"{i}.png", "text": f"caption {i}"}) for i in range(60)]
    lines[10] = ""  # a blank line: no row, but the numbering goes on
    lines[20] = '{"image": "20.png", "text": '  # cut short
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")

    plan = plan_table(Location.of(tmp_path / "rows.jsonl"), COLUMNS, {"image"}, field="source.path")

    assert len(plan.chunks) > 5 and plan.num_rows == 59
    rows = pd.concat([read_chunk(plan, chunk) for chunk in plan.chunks], ignore_index=True)
    assert rows[ROW].tolist() == [n for n in range(1, 61) if n != 11]
    assert rows.loc[rows[ROW] == 30, "text"].item() == "caption 29"
    assert rows.loc[rows[ROW] == 30, "image"].item() == str(tmp_path / "29.png")  # relative to the table
    bad = rows[rows[ROW_ERROR].notna()]
    assert bad[ROW].tolist() == [21] and bad[ROW_ERROR].item().startswith("not valid JSON")


def test_parquet_counts_and_filled_columns_come_from_the_footers(tmp_path):
    table = pa.table({"image": ["a.png"] * 10, "text": ["x"] * 10, "strength": [None] * 10, "seed": [1] + [None] * 9})
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=4)

    plan = plan_table(Location.of(tmp_path / "rows.parquet"), COLUMNS, {"image"}, field="source.path")

    assert [c.num_rows for c in plan.chunks] == [4, 4, 2] and plan.num_rows == 10
    assert "seed" in plan.filled and "strength" not in plan.filled
    assert len(plan.limited(5).chunks) == 2


def test_a_row_locator_reads_rows_by_number_across_chunks(tmp_path):
    pq.write_table(
        pa.table({"image": [f"{i}.png" for i in range(9)], "text": list("abcdefghi")}),
        tmp_path / "t.parquet",
        row_group_size=2,
    )
    plan = plan_table(Location.of(tmp_path / "t.parquet"), COLUMNS, {"image"}, field="train.train_data_dir")
    rows = RowLocator(plan).rows([8, 0, 3, 3])
    assert rows["text"].tolist() == ["i", "a", "d", "d"]
    assert rows["source_ref"].tolist() == ["t.parquet:9", "t.parquet:1", "t.parquet:4", "t.parquet:4"]


def test_a_missing_column_is_named_with_the_columns_there(tmp_path):
    (tmp_path / "rows.csv").write_text("image,caption\na.png,x\n")
    with pytest.raises(
        ConfigError, match=r"rows\.csv: no column for caption_column \(text\); columns are image, caption"
    ):
        plan_table(Location.of(tmp_path / "rows.csv"), COLUMNS, {"image"}, field="source.path")
