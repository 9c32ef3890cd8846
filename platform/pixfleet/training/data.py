"""Training data on Ray Data: read, decode, resize/crop, normalise and tokenize on CPU.

Columns out, per example (what the training step consumes):
  pixel_values               float32 (3, R, R) in [-1, 1]   the target image
  conditioning_pixel_values  float32 (3, R, R) in [0, 1]    the control image
  input_ids                  int64 (77,)                    the tokenized caption
as train_controlnet.py's `make_train_dataset` prepares them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import ray.data

from pixfleet.config import ConfigError
from pixfleet.config.training import ControlNetTrainingArgs
from pixfleet.data.tables import UnreadableImage, load_dataset_table, read_image_bytes, read_image_table
from pixfleet.engine.images import RowError, decode_image
from pixfleet.engine.preprocess import fit_image
from pixfleet.models.registry import local_model

PREPROCESS_CPUS = 0.25  # fractional: leaves room for readers beside the train workers
MAX_IMAGE_PIXELS = 8192 * 8192


def with_local_models(args: ControlNetTrainingArgs, registry_uri: str) -> ControlNetTrainingArgs:
    """`args` with MLflow model URIs replaced by folders downloaded on this node: each worker
    reads the registry itself, none needs the driver's disk."""
    return args.model_copy(
        update={
            "pretrained_model_name_or_path": local_model(args.pretrained_model_name_or_path, registry_uri),
            "controlnet_model_name_or_path": local_model(args.controlnet_model_name_or_path, registry_uri),
        }
    )


def training_dataset(args: ControlNetTrainingArgs, registry_uri: str) -> tuple[ray.data.Dataset, int]:
    """The lazily preprocessed training set and its row count; a table that cannot work fails here."""
    columns = {
        "image_column": args.image_column,
        "conditioning_image_column": args.conditioning_image_column,
        "caption_column": args.caption_column,
    }
    image_columns = {args.image_column, args.conditioning_image_column}
    if args.dataset_name:
        loaded = load_dataset_table(
            args.dataset_name,
            args.dataset_config_name,
            args.cache_dir,
            columns,
            image_columns,
            args.max_train_samples,
            field="train.dataset_name",
        )
    else:
        loaded = read_image_table(
            Path(args.train_data_dir), columns, image_columns, args.max_train_samples, field="train.train_data_dir"
        )
    table = loaded.table[list(dict.fromkeys(columns.values()))].copy()
    table["source_ref"] = loaded.refs
    dataset = ray.data.from_pandas(table).map_batches(
        TrainPreprocess,
        fn_constructor_args=(args, registry_uri),
        batch_format="pandas",
        num_cpus=PREPROCESS_CPUS,
        compute=ray.data.ActorPoolStrategy(size=max(1, args.dataloader_num_workers)),
    )
    return dataset, len(table)


def load_tokenizer(args: ControlNetTrainingArgs):
    """`tokenizer_name` when set, else the base model's tokenizer, as the script loads it."""
    from transformers import AutoTokenizer

    if args.tokenizer_name:
        return AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision, cache_dir=args.cache_dir)
    return AutoTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision, cache_dir=args.cache_dir
    )


def empty_prompt_chosen(seed: int | None, source_ref: str, proportion: float) -> bool:
    """Replace this row's caption with ""? Derived from the seed and the row, not call order."""
    if proportion <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{source_ref}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < proportion


class TrainPreprocess:
    """Callable class for an actor pool: holds the base model's tokenizer."""

    def __init__(self, args: ControlNetTrainingArgs, registry_uri: str = ""):
        self.args = args = with_local_models(args, registry_uri)
        self.tokenizer = load_tokenizer(args)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        args = self.args
        captions = []
        for ref, caption in zip(batch["source_ref"], batch[args.caption_column], strict=True):
            if isinstance(caption, list | np.ndarray):  # several captions: the script takes one
                caption = caption[0] if len(caption) else ""
            if not isinstance(caption, str):
                raise ConfigError(f"{ref}: {args.caption_column} must be text, got {type(caption).__name__}")
            captions.append("" if empty_prompt_chosen(args.seed, ref, args.proportion_empty_prompts) else caption)
        input_ids = self.tokenizer(
            captions, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True
        ).input_ids
        return pd.DataFrame(
            {
                "pixel_values": [
                    self._image(v, ref, args.image_column) * 2.0 - 1.0
                    for v, ref in zip(batch[args.image_column], batch["source_ref"], strict=True)
                ],
                "conditioning_pixel_values": [
                    self._image(v, ref, args.conditioning_image_column)
                    for v, ref in zip(batch[args.conditioning_image_column], batch["source_ref"], strict=True)
                ],
                "input_ids": [np.asarray(ids, dtype=np.int64) for ids in input_ids],
            }
        )

    def _image(self, value, ref: str, column: str) -> np.ndarray:
        """CHW float32 in [0, 1], resized (shorter side) and center-cropped to the resolution."""
        try:
            array = decode_image(read_image_bytes(value), f"{ref} {column}", MAX_IMAGE_PIXELS)
        except UnreadableImage as error:  # training cannot skip rows silently: name the row and stop
            raise ConfigError(f"{ref} {column}: {error}") from None
        except RowError as error:
            raise ConfigError(str(error)) from None
        size = self.args.resolution
        # train_controlnet.py: transforms.Resize(resolution, BILINEAR) then CenterCrop(resolution).
        array = fit_image(array, size, size, "center_crop", "bilinear")
        return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / 255.0
