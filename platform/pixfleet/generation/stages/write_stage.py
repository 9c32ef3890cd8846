"""Write stage (CPU tasks): image files, then the batch's manifest part (see `sink` for the layout).

Needs: row_id, image_index, status, error, source_ref, input_files, prompt, params, seed,
       sampler, prompt_tokens, prompt_truncated, generate_s, encoded, width, height.
Adds:  output_path (and control_maps in the manifest, the evaluate stage's scores when it
       ran); returns only the columns the driver
       counts (`sink.DRIVER_COLUMNS`).
"""

from __future__ import annotations

import hashlib
import json
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pixfleet.config import PreprocessConfig, SinkConfig
from pixfleet.engine import columns as C
from pixfleet.generation.sink import (
    DRIVER_COLUMNS,
    MANIFEST_SCHEMA,
    PARAM_COLUMNS,
    PARTS_DIR,
    control_map_location,
    output_name,
)
from pixfleet.generation.stages import LIGHT_CPU, PlannedStage
from pixfleet.generation.stages.encode_stage import ENCODED
from pixfleet.models.identity import ModelIdentity, short_hash
from pixfleet.storage import Location


class WriteStage:
    """Callable for `map_batches(batch_format="pandas")`."""

    needs = (
        C.ROW_ID,
        C.IMAGE_INDEX,
        C.STATUS,
        C.ERROR,
        C.SOURCE_REF,
        C.INPUT_FILES,
        C.PROMPT,
        C.PARAMS,
        C.SEED,
        C.SAMPLER,
        C.PROMPT_TOKENS,
        C.PROMPT_TRUNCATED,
        C.GENERATE_SECONDS,
        ENCODED,
        C.WIDTH,
        C.HEIGHT,
    )

    def __init__(self, config: SinkConfig, model: ModelIdentity, preprocess: PreprocessConfig, num_controlnets: int):
        self.config = config
        self.control_maps = num_controlnets if config.save_control_maps else 0
        self.control_preprocessing = json.dumps(preprocess.control_provenance(num_controlnets))
        self.root = Location.of(config.output_dir)
        self.extension = "jpg" if config.image_format == "jpeg" else config.image_format
        self.model = json.dumps(model.as_dict(), sort_keys=True)
        self.model_hash = short_hash(model.base_model_hash)

    @classmethod
    def plan(cls, *args) -> PlannedStage:
        return PlannedStage(cls(*args), cls.needs, (C.OUTPUT_PATH,), {"num_cpus": 2 * LIGHT_CPU})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "write stage")
        records = []
        for row in batch.to_dict("records"):
            start = time.perf_counter()
            params = json.loads(row[C.PARAMS]) if row[C.PARAMS] else {}
            path, control_maps = "", []
            if row[C.STATUS] == C.OK:
                name = output_name(row[C.ROW_ID], row[C.IMAGE_INDEX], params["num_images_per_prompt"])
                image = self.root / "images" / f"{name}.{self.extension}"
                image.write_bytes(row[ENCODED])
                path = image.uri
                control_maps = [
                    control_map_location(self.root, row[C.ROW_ID], i).uri for i in range(self.control_maps)
                ]
            records.append(
                {
                    **{name: params.get(name) for name in PARAM_COLUMNS},
                    **{name: row[name] for name in (C.ROW_ID, C.IMAGE_INDEX, C.STATUS, C.ERROR, C.SOURCE_REF)},
                    **{name: row[name] for name in (C.PROMPT, C.SEED, C.SAMPLER, C.WIDTH, C.HEIGHT)},
                    C.PROMPT_TOKENS: row[C.PROMPT_TOKENS],
                    C.PROMPT_TRUNCATED: row[C.PROMPT_TRUNCATED],
                    C.OUTPUT_PATH: path,
                    C.INPUT_FILES: json.loads(row[C.INPUT_FILES]),
                    C.CONTROL_MAPS: control_maps,
                    "model": self.model,
                    "model_hash": self.model_hash,
                    "control_preprocessing": self.control_preprocessing,
                    C.GENERATE_SECONDS: row[C.GENERATE_SECONDS],
                    "write_s": time.perf_counter() - start,
                    **{name: row.get(name) for name in C.SCORE_COLUMNS},  # with an `evaluate` section
                }
            )
        written = [r for r in records if r[C.STATUS] != C.SKIPPED]
        if written:
            ids = "\n".join(sorted(f"{r[C.ROW_ID]}:{r[C.IMAGE_INDEX]}" for r in written))
            digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
            table = pa.Table.from_pylist(written, schema=MANIFEST_SCHEMA)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            (self.root / PARTS_DIR / f"part-{digest}.parquet").write_bytes(sink.getvalue().to_pybytes())
        return pd.DataFrame(records)[list(DRIVER_COLUMNS)]
