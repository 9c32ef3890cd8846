"""Sink: image files named from row ids plus a parquet manifest, written so reruns resume.

Layout under `output_dir`:
  images/<row_id>[_<k>].<ext>      written atomically (temp file + rename)
  manifest/part-<digest>.parquet   one per written batch, after its images; the name derives
                                   from the batch's row ids, so a retried batch replaces its part
  manifest.parquet                 all parts merged at the end of a run
A row is finished when a manifest part records it ok; a rerun skips finished rows, and a
killed run loses at most the batches in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pixfleet.config import SinkConfig
from pixfleet.generation import columns as C
from pixfleet.generation.stages.encode_stage import ENCODED

MANIFEST_SCHEMA = pa.schema(
    [
        (C.ROW_ID, pa.string()),
        (C.IMAGE_INDEX, pa.int32()),
        (C.STATUS, pa.string()),
        (C.ERROR, pa.string()),
        (C.OUTPUT_PATH, pa.string()),
        (C.SOURCE_REF, pa.string()),
        (C.PROMPT, pa.string()),
        ("negative_prompt", pa.string()),
        (C.SEED, pa.int64()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("image_guidance_scale", pa.float64()),
        ("strength", pa.float64()),
        ("controlnet_conditioning_scale", pa.list_(pa.float64())),
        ("guess_mode", pa.bool_()),
        ("control_guidance_start", pa.list_(pa.float64())),
        ("control_guidance_end", pa.list_(pa.float64())),
        ("num_images_per_prompt", pa.int32()),
        ("sampler", pa.string()),
        ("model", pa.string()),
        (C.GENERATE_SECONDS, pa.float64()),
        ("write_s", pa.float64()),
    ]
)
# What each written row reports back to the driver (counts, failures, timings).
DRIVER_COLUMNS = (C.ROW_ID, C.IMAGE_INDEX, C.STATUS, C.ERROR, C.OUTPUT_PATH, C.SEED, C.GENERATE_SECONDS)
_PARAM_FIELDS = [
    f.name
    for f in MANIFEST_SCHEMA
    if f.name
    in {
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "image_guidance_scale",
        "strength",
        "controlnet_conditioning_scale",
        "guess_mode",
        "control_guidance_start",
        "control_guidance_end",
        "num_images_per_prompt",
    }
]


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder and rename: no half-written file survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def output_name(row_id: str, image_index: int, num_images: int) -> str:
    return row_id if num_images == 1 else f"{row_id}_{image_index}"


class WriteStage:
    """Write each ok image, then the batch's manifest part; returns the manifest rows."""

    def __init__(self, config: SinkConfig, model: dict[str, Any]):
        self.root = Path(config.output_dir)
        self.extension = "jpg" if config.image_format == "jpeg" else config.image_format
        self.model = json.dumps(model, sort_keys=True)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, (C.ROW_ID, C.IMAGE_INDEX, C.STATUS, ENCODED, C.PARAMS), "write stage")
        records = []
        for row in batch.to_dict("records"):
            start = time.perf_counter()
            params = json.loads(row[C.PARAMS]) if row[C.PARAMS] else {}
            path = ""
            if row[C.STATUS] == C.OK:
                name = output_name(row[C.ROW_ID], row[C.IMAGE_INDEX], params["num_images_per_prompt"])
                path = str(self.root / "images" / f"{name}.{self.extension}")
                atomic_write(Path(path), row[ENCODED])
            records.append(
                {
                    **{name: params.get(name) for name in _PARAM_FIELDS},
                    C.ROW_ID: row[C.ROW_ID],
                    C.IMAGE_INDEX: row[C.IMAGE_INDEX],
                    C.STATUS: row[C.STATUS],
                    C.ERROR: row[C.ERROR],
                    C.OUTPUT_PATH: path,
                    C.SOURCE_REF: row[C.SOURCE_REF],
                    C.PROMPT: row[C.PROMPT],
                    C.SEED: row[C.SEED],
                    "sampler": row["sampler"],
                    "model": self.model,
                    C.GENERATE_SECONDS: row[C.GENERATE_SECONDS],
                    "write_s": time.perf_counter() - start,
                }
            )
        written = [r for r in records if r[C.STATUS] != C.SKIPPED]
        if written:
            ids = "\n".join(sorted(f"{r[C.ROW_ID]}:{r[C.IMAGE_INDEX]}" for r in written))
            digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
            table = pa.Table.from_pylist(written, schema=MANIFEST_SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            atomic_write(self.root / "manifest" / f"part-{digest}.parquet", sink.getvalue().to_pybytes())
        return pd.DataFrame(records)[list(DRIVER_COLUMNS)]


class Manifest:
    """Read side of the sink: which rows are finished, and the merged manifest."""

    def __init__(self, config: SinkConfig):
        self.root = Path(config.output_dir)

    def read_parts(self) -> pd.DataFrame:
        parts = sorted((self.root / "manifest").glob("part-*.parquet"))
        if not parts:
            return MANIFEST_SCHEMA.empty_table().to_pandas()
        return pd.concat([pq.read_table(p, schema=MANIFEST_SCHEMA).to_pandas() for p in parts])

    def finished_row_ids(self) -> frozenset[str]:
        """Rows all of whose images an earlier run recorded ok."""
        table = self.read_parts()
        ok = table[table[C.STATUS] == C.OK]
        counts = ok.drop_duplicates([C.ROW_ID, C.IMAGE_INDEX]).groupby(C.ROW_ID).size()
        wanted = ok.groupby(C.ROW_ID)["num_images_per_prompt"].first()
        return frozenset(counts.index[counts.values >= wanted.loc[counts.index].values])

    def merge(self) -> pd.DataFrame:
        """One row per (row_id, image_index): ok wins over failed, the latest part otherwise."""
        table = self.read_parts()
        table = table.assign(_ok=table[C.STATUS] == C.OK).sort_values("_ok", kind="stable")
        merged = table.drop_duplicates([C.ROW_ID, C.IMAGE_INDEX], keep="last").drop(columns="_ok")
        merged = merged.sort_values([C.ROW_ID, C.IMAGE_INDEX]).reset_index(drop=True)
        pq.write_table(
            pa.Table.from_pandas(merged, schema=MANIFEST_SCHEMA, preserve_index=False),
            self.root / "manifest.parquet",
        )
        return merged
