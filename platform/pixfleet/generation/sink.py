"""Sink: image files named from row ids plus a parquet manifest, written so reruns resume.

The write side is `stages/write_stage.py`; this module holds the layout and the read side.

Layout under `output_dir`:
  images/<row_id>[_<k>].<ext>      written atomically (temp file + rename)
  control_maps/<row_id>_<i>.png    the maps fed to ControlNet i, with sink.save_control_maps
  manifest/part-<digest>.parquet   one per written batch, after its images; the name derives
                                   from the batch's row ids, so a retried batch replaces its part
  manifest.parquet                 all parts merged at the end of a run
A row is finished when a manifest part records it ok; a rerun skips finished rows, and a
killed run loses at most the batches in flight.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pixfleet.config import SinkConfig
from pixfleet.engine import columns as C

MANIFEST_SCHEMA = pa.schema(
    [
        (C.ROW_ID, pa.string()),
        (C.IMAGE_INDEX, pa.int32()),
        (C.STATUS, pa.string()),
        (C.ERROR, pa.string()),
        (C.OUTPUT_PATH, pa.string()),
        (C.SOURCE_REF, pa.string()),
        (C.INPUT_FILES, pa.list_(pa.string())),  # the input image files, "" for embedded bytes
        (C.CONTROL_MAPS, pa.list_(pa.string())),
        (C.PROMPT, pa.string()),
        ("negative_prompt", pa.string()),
        (C.SEED, pa.int64()),
        (C.WIDTH, pa.int32()),
        (C.HEIGHT, pa.int32()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("image_guidance_scale", pa.float64()),
        ("strength", pa.float64()),
        ("controlnet_conditioning_scale", pa.list_(pa.float64())),
        ("guess_mode", pa.bool_()),
        ("control_guidance_start", pa.list_(pa.float64())),
        ("control_guidance_end", pa.list_(pa.float64())),
        ("num_images_per_prompt", pa.int32()),
        (C.SAMPLER, pa.string()),
        (C.PROMPT_TOKENS, pa.int32()),
        (C.PROMPT_TRUNCATED, pa.bool_()),
        ("model", pa.string()),  # JSON: names as configured, content hashes, settings
        ("model_hash", pa.string()),  # A1111's short `Model hash` of the base model
        (C.GENERATE_SECONDS, pa.float64()),
        ("write_s", pa.float64()),
    ]
)
# What each written row reports back to the driver (counts, failures, timings).
DRIVER_COLUMNS = (
    C.ROW_ID,
    C.IMAGE_INDEX,
    C.STATUS,
    C.ERROR,
    C.SOURCE_REF,
    C.OUTPUT_PATH,
    C.SEED,
    C.GENERATE_SECONDS,
)
# Resolved parameters recorded as manifest columns of their own.
PARAM_COLUMNS = [
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


def control_map_path(config: SinkConfig, row_id: str, index: int) -> Path:
    return Path(config.output_dir) / "control_maps" / f"{row_id}_{index}.png"


def save_control_map(config: SinkConfig, row_id: str, index: int, image: np.ndarray) -> None:
    """The control map of ControlNet `index` for a row, as a PNG under `control_maps/`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    atomic_write(control_map_path(config, row_id, index), buffer.getvalue())


def output_name(row_id: str, image_index: int, num_images: int) -> str:
    return row_id if num_images == 1 else f"{row_id}_{image_index}"


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
