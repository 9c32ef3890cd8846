"""Dry-run stage (an actor pool, the tokenizer loaded once per actor): stands in for generate and
encode in `pixfleet generate --dry-run`.

Needs: row_id, status, prompt, params, seed, source_ref, input_files and the task's image columns.
Adds:  what generate and encode add, without an image: one row per image the job would make,
       status `planned` (failed and skipped rows pass through), its seed, the size the pipeline
       would generate (the fitted images rounded down to the VAE's multiple, as the runner
       rounds them), the prompt's tokens against the text encoder's limit, the sampler.
No model is loaded: the VAE's scale factor comes from its config, the sampler from the
scheduler's config, and the tokens from the base model's tokenizer.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import ray.data

from pixfleet.config import ModelSpec, ResourcesConfig
from pixfleet.engine import columns as C
from pixfleet.engine.preprocess import generated_size, size_multiple
from pixfleet.generation.stages import LIGHT_CPU, PlannedStage
from pixfleet.generation.stages.encode_stage import ENCODED
from pixfleet.generation.stages.generate_stage import ADDS as GENERATE_ADDS
from pixfleet.generation.stages.generate_stage import GenerateStage


class DryRunStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(self, spec: ModelSpec, image_columns: list[str]):
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import AutoTokenizer

        from pixfleet.engine.runner import A1111_SAMPLERS
        from pixfleet.models.folders import fetch_model_files
        from pixfleet.models.schedulers import SCHEDULERS

        spec = fetch_model_files(spec)  # its configs and tokenizer alone are read
        vae = AutoencoderKL.load_config(spec.base_model, subfolder="vae")
        self.size_multiple = size_multiple(spec.task, 2 ** (len(vae["block_out_channels"]) - 1))
        if spec.scheduler:
            scheduler = SCHEDULERS[spec.scheduler][0].__name__
        else:
            # Any scheduler class reads scheduler_config.json; `_class_name` says whose it is.
            scheduler = DDPMScheduler.load_config(spec.base_model, subfolder="scheduler")["_class_name"]
        self.sampler = A1111_SAMPLERS.get(scheduler, "")
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base_model, subfolder="tokenizer")
        self.image_columns = image_columns
        self.needs = GenerateStage.columns_needed(image_columns)

    @classmethod
    def plan(cls, spec: ModelSpec, image_columns: list[str], resources: ResourcesConfig) -> PlannedStage:
        adds = (*[c for c in GENERATE_ADDS if c != C.IMAGE], ENCODED, C.WIDTH, C.HEIGHT)
        options = {
            "fn_constructor_args": (spec, image_columns),
            "num_cpus": LIGHT_CPU,
            "compute": ray.data.ActorPoolStrategy(size=resources.preprocess_actors),
        }
        return PlannedStage(cls, GenerateStage.columns_needed(image_columns), adds, options)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "dry-run stage")
        rows = batch.to_dict("records")
        planned = [row for row in rows if row[C.STATUS] == C.OK]
        tokens = dict(zip(map(id, planned), self._tokens([r[C.PROMPT] for r in planned]), strict=True))
        outputs = []
        for row in rows:
            if row[C.STATUS] != C.OK:
                outputs.append(self._output(row, 0, row[C.STATUS], 0, (0, 0)))
                continue
            image = row[self.image_columns[0]]
            size = generated_size(int(image.shape[1]), int(image.shape[0]), self.size_multiple)
            images = json.loads(row[C.PARAMS])["num_images_per_prompt"]
            outputs += [self._output(row, k, C.PLANNED, tokens[id(row)], size) for k in range(images)]
        return pd.DataFrame(outputs)

    def _tokens(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(prompts).input_ids] if prompts else []

    def _output(self, row: dict, index: int, status: str, tokens: int, size: tuple[int, int]) -> dict[str, Any]:
        return {
            C.ROW_ID: row[C.ROW_ID],
            C.IMAGE_INDEX: index,
            C.SOURCE_REF: row[C.SOURCE_REF],
            C.INPUT_FILES: row[C.INPUT_FILES],
            C.STATUS: status,
            C.ERROR: row[C.ERROR],
            C.PROMPT: row[C.PROMPT],
            C.PARAMS: row[C.PARAMS],
            C.SEED: row[C.SEED] + index if status == C.PLANNED else row[C.SEED],
            C.SAMPLER: self.sampler,
            C.PROMPT_TOKENS: tokens,
            C.PROMPT_TRUNCATED: tokens > self.tokenizer.model_max_length if tokens else False,
            C.GENERATE_SECONDS: 0.0,
            ENCODED: b"",
            C.WIDTH: size[0],
            C.HEIGHT: size[1],
        }
