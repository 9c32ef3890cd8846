"""The manifest's read side: finished rows and the merge, from parts as the write stage leaves them."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pixfleet.engine import columns as C
from pixfleet.generation.sink import MANIFEST_SCHEMA, FinishedRows, Manifest


def write_part(folder, name: str, records: list[dict]) -> None:
    rows = [{**dict.fromkeys(MANIFEST_SCHEMA.names), "num_images_per_prompt": 1, **r} for r in records]
    (folder / "manifest").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), folder / "manifest" / name)


def test_ok_wins_over_failed_and_every_row_is_merged_once(tmp_path):
    write_part(
        tmp_path,
        "part-a.parquet",
        [
            {C.ROW_ID: "r1", C.IMAGE_INDEX: 0, C.STATUS: C.FAILED, C.ERROR: "out of memory"},
            {C.ROW_ID: "r2", C.IMAGE_INDEX: 0, C.STATUS: C.OK, C.OUTPUT_PATH: "r2.png"},
            {C.ROW_ID: "r3", C.IMAGE_INDEX: 0, C.STATUS: C.OK, "num_images_per_prompt": 2},
        ],
    )
    write_part(
        tmp_path,
        "part-b.parquet",
        [
            {C.ROW_ID: "r1", C.IMAGE_INDEX: 0, C.STATUS: C.OK, C.OUTPUT_PATH: "r1.png"},
            {C.ROW_ID: "r4", C.IMAGE_INDEX: 0, C.STATUS: C.FAILED, C.ERROR: "bad image"},
        ],
    )
    manifest = Manifest(str(tmp_path))

    finished = manifest.finished()
    assert {"r1", "r2"} <= {r for r in ("r1", "r2", "r3", "r4") if r in finished}
    assert "r3" not in finished and "r4" not in finished  # r3 has one of its two images

    result = manifest.merge()

    merged = pd.read_parquet(tmp_path / "manifest.parquet")
    assert sorted(merged[C.ROW_ID]) == ["r1", "r2", "r3", "r4"] and (result.rows, result.ok, result.failed) == (
        4,
        3,
        1,
    )
    assert merged.set_index(C.ROW_ID).loc["r1", C.STATUS] == C.OK
    assert not list((tmp_path / "manifest").glob("*.parquet"))  # merged, then removed
    assert set(FinishedRows.of(["r1", "r2"]).digests) == set(manifest.finished().digests)

    write_part(tmp_path, "part-c.parquet", [{C.ROW_ID: "r4", C.IMAGE_INDEX: 0, C.STATUS: C.OK}])
    assert "r4" in manifest.finished()  # a later run's part beside the merged manifest
    assert Manifest(str(tmp_path)).merge().rows == 4


def test_finishing_a_job_that_failed_before_its_first_row_writes_nothing_and_raises_nothing(tmp_path):
    from pixfleet.generation.gallery import finish_output
    from pixfleet.storage import Location

    result = finish_output(Location.of(tmp_path), gallery=True)  # the job's own error is the one to see

    assert result.rows == 0 and list(tmp_path.iterdir()) == []
