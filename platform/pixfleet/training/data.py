"""Training data on Ray Data: read, decode, resize/crop, normalise and prepare the text on CPU.

Columns out, per example (what the training step consumes):
  pixel_values               float32 (3, R, R) in [-1, 1]   the target image
  conditioning_pixel_values  float32 (3, R, R) in [0, 1]    the control image
and the text side: for an SD base, as train_controlnet.py's `make_train_dataset` prepares it,
  input_ids                  int64 (77,)                    the tokenized caption
for an SDXL base, as train_controlnet_sdxl.py's `compute_embeddings` precomputes it,
  prompt_embeds              float32 (77, D1 + D2)          both text encoders' hidden states
  text_embeds                float32 (D2,)                  the pooled embedding
  time_ids                   float32 (6,)                   original size, crop top-left, target size
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray.data

from pixfleet.config import ConfigError
from pixfleet.config.training import ControlNetTrainingArgs
from pixfleet.data.blocks import in_blocks
from pixfleet.data.tables import (
    RowLocator,
    TablePlan,
    UnreadableImage,
    load_dataset_table,
    plan_table,
    read_image_bytes,
)
from pixfleet.engine.images import RowError, decode_image
from pixfleet.engine.preprocess import center_crop_plan, fit_image
from pixfleet.models.registry import local_model
from pixfleet.storage import Location
from pixfleet.training.components import (
    SDXLPromptEncoder,
    base_is_sdxl,
    interpolation,
    load_tokenizer,
    sdxl_time_ids,
)

PREPROCESS_CPUS = 0.25  # fractional: leaves room for readers beside the train workers
MAX_IMAGE_PIXELS = 8192 * 8192


def with_local_models(args: ControlNetTrainingArgs, registry_uri: str) -> ControlNetTrainingArgs:
    """`args` with MLflow model URIs and folders in object storage (models, a checkpoint to resume
    from) replaced by copies downloaded on this node: each worker fetches them itself, none
    needs the driver's disk."""
    resume = args.resume_from_checkpoint
    return args.model_copy(
        update={
            "pretrained_model_name_or_path": local_model(args.pretrained_model_name_or_path, registry_uri),
            "controlnet_model_name_or_path": local_model(args.controlnet_model_name_or_path, registry_uri),
            "pretrained_vae_model_name_or_path": local_model(args.pretrained_vae_model_name_or_path, registry_uri),
            "resume_from_checkpoint": resume if resume in (None, "latest") else local_model(resume, registry_uri),
        }
    )


def training_table(args: ControlNetTrainingArgs) -> TablePlan:
    """Where the rows to train on are (files and chunks, never the rows): checked here, on the
    driver, for the columns the step needs, so a table that cannot work fails before any worker
    starts. Each rank's readers read their own rows (`RowLocator`)."""
    columns = {
        "image_column": args.image_column,
        "conditioning_image_column": args.conditioning_image_column,
        "caption_column": args.caption_column,
    }
    image_columns = {args.image_column, args.conditioning_image_column}
    if args.dataset_name:
        plan = load_dataset_table(
            args.dataset_name, args.dataset_config_name, args.cache_dir, columns, image_columns, "train.dataset_name"
        )
    else:
        location = Location.of(args.train_data_dir)
        plan = plan_table(location, columns, image_columns, field="train.train_data_dir")
    return plan.limited(args.max_train_samples)


def table_rows(plan: TablePlan, args: ControlNetTrainingArgs) -> int:
    """Rows training uses: the (counted) table's, up to max_train_samples."""
    return min(plan.num_rows, args.max_train_samples or plan.num_rows)


@dataclass(frozen=True)
class DataPlan:
    """Which table rows each worker trains on, in which order.

    Every epoch is a fresh permutation of the table (seeded by the seed and the epoch, as the
    script's shuffling DataLoader), dealt round-robin to the ranks, each rank's share cut to
    whole batches (all ranks step alike). Micro-batch `k` of a rank is thus fixed by the seed:
    a resumed run starts at the micro-batch after its checkpoint and sees exactly the batches
    an uninterrupted run would.
    """

    num_rows: int
    world_size: int
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // self.world_size // self.batch_size

    def rows(self, rank: int, first_batch: int, num_batches: int) -> np.ndarray:
        """Table row numbers of this rank's micro-batches `first_batch` onwards, in order."""
        size, per_epoch = self.batch_size, self.batches_per_epoch
        out, batch, end = [], first_batch, first_batch + num_batches
        while batch < end:  # one permutation per epoch touched, none kept
            epoch, position = divmod(batch, per_epoch)
            share = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)[rank :: self.world_size]
            taken = min(end - batch, per_epoch - position)
            out.append(share[position * size : (position + taken) * size])
            batch += taken
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


BATCHES_PER_SPAN = 4096  # micro-batches one planning item covers: one permutation per epoch touched


def planned_dataset(
    plan: DataPlan,
    rank: int,
    first_batch: int,
    num_batches: int,
    table: TablePlan,
    args: ControlNetTrainingArgs,
    registry_uri: str,
) -> ray.data.Dataset:
    """This rank's micro-batches as one stream across epochs: one actor pool for the whole run
    and no restart between epochs, so the next epoch's first batches are ready on time.

    Only row numbers travel through Ray Data, expanded from spans of micro-batches in tasks and
    cut into blocks of two micro-batches (the first batch is ready after two micro-batches'
    work); the preprocessing actors read the rows they are given (`RowLocator`)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    spans = [
        {"first": start, "count": min(BATCHES_PER_SPAN, first_batch + num_batches - start)}
        for start in range(first_batch, first_batch + num_batches, BATCHES_PER_SPAN)
    ]
    # from_items builds its blocks here: from_numpy and from_pandas would start tasks of a whole
    # CPU each, which a cluster whose CPUs the train workers hold never runs (a silent hang).
    rows = ray.data.from_items(spans).flat_map(_SpanRows(plan, rank), num_cpus=PREPROCESS_CPUS / 2)
    return in_blocks(rows, 2 * plan.batch_size, PREPROCESS_CPUS / 2).map_batches(
        PlannedRows,
        fn_constructor_args=(args, registry_uri, table),
        batch_size=plan.batch_size,
        batch_format="pandas",
        num_cpus=PREPROCESS_CPUS,
        compute=ray.data.ActorPoolStrategy(size=max(1, args.dataloader_num_workers)),
    )


class _SpanRows:
    """A span of a rank's micro-batches -> its table row numbers, in order."""

    def __init__(self, plan: DataPlan, rank: int):
        self.plan, self.rank = plan, rank

    def __call__(self, span: dict) -> list[dict]:
        return [{"row": int(row)} for row in self.plan.rows(self.rank, span["first"], span["count"])]


def empty_prompt_chosen(seed: int | None, source_ref: str, proportion: float) -> bool:
    """Replace this row's caption with ""? Derived from the seed and the row, not call order."""
    if proportion <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{source_ref}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < proportion


class TrainPreprocess:
    """Callable class for an actor pool: holds the tokenizer (SD) or both text encoders (SDXL)."""

    def __init__(self, args: ControlNetTrainingArgs, registry_uri: str = ""):
        self.args = args = with_local_models(args, registry_uri)
        self.interpolation = interpolation(args)
        self.prompt_encoder = SDXLPromptEncoder(args) if base_is_sdxl(args) else None
        self.tokenizer = None if self.prompt_encoder else load_tokenizer(args)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        args, refs = self.args, batch["source_ref"]
        images = [
            self._image(v, ref, args.image_column) for v, ref in zip(batch[args.image_column], refs, strict=True)
        ]
        controls = [
            self._image(v, ref, args.conditioning_image_column)[0]
            for v, ref in zip(batch[args.conditioning_image_column], refs, strict=True)
        ]
        out = pd.DataFrame(
            {"pixel_values": [image * 2.0 - 1.0 for image, _ in images], "conditioning_pixel_values": controls}
        )
        captions = self._captions(batch)
        if self.prompt_encoder:
            prompt_embeds, pooled = self.prompt_encoder(captions)
            out["prompt_embeds"] = list(prompt_embeds.float().numpy())
            out["text_embeds"] = list(pooled.float().numpy())
            out["time_ids"] = [sdxl_time_ids(args, *crop) for _, crop in images]
        else:
            ids = self.tokenizer(
                captions, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True
            ).input_ids
            out["input_ids"] = [np.asarray(row, dtype=np.int64) for row in ids]
        return out

    def _captions(self, batch: pd.DataFrame) -> list[str]:
        args, captions = self.args, []
        for ref, caption in zip(batch["source_ref"], batch[args.caption_column], strict=True):
            if isinstance(caption, list | np.ndarray):  # several captions: the script takes one
                caption = caption[0] if len(caption) else ""
            if not isinstance(caption, str):
                raise ConfigError(f"{ref}: {args.caption_column} must be text, got {type(caption).__name__}")
            captions.append("" if empty_prompt_chosen(args.seed, ref, args.proportion_empty_prompts) else caption)
        return captions

    def _image(self, value, ref: str, column: str) -> tuple[np.ndarray, tuple[tuple[int, int], tuple[int, int]]]:
        """CHW float32 in [0, 1], resized (shorter side) and center-cropped to the resolution; and
        ((original height, width), (crop top, left)), SDXL's micro-conditioning of the row."""
        try:
            array = decode_image(read_image_bytes(value), f"{ref} {column}", MAX_IMAGE_PIXELS)
        except UnreadableImage as error:  # training cannot skip rows silently: name the row and stop
            raise ConfigError(f"{ref} {column}: {error}") from None
        except RowError as error:
            raise ConfigError(str(error)) from None
        size, (height, width) = self.args.resolution, array.shape[:2]
        _, (left, top) = center_crop_plan((width, height), size, size)
        # The scripts: transforms.Resize(resolution) to the shorter side, then CenterCrop(resolution).
        array = fit_image(array, size, size, "center_crop", self.interpolation)
        chw = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / 255.0
        return chw, ((height, width), (top, left))


class PlannedRows:
    """Callable class for a rank's actor pool: table row numbers in, training examples out."""

    def __init__(self, args: ControlNetTrainingArgs, registry_uri: str, table: TablePlan):
        self.rows = RowLocator(table)
        self.preprocess = TrainPreprocess(args, registry_uri)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.preprocess(self.rows.rows(batch["row"]))
