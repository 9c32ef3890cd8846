"""Column names: the interface between generation stages, and the check every stage runs.

Serving builds the same rows for its model replicas, so these are the engine's row keys too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ROW_ID = "row_id"  # stable id: from the source, or a hash (see params.row_id_for)
SOURCE_REF = "source_ref"  # where the row came from, for error messages ("file.jsonl:12")
ROW_PARAMS = "row_params"  # JSON of the row's own prompt and parameters, as the source gave them
LOAD_ERRORS = "load_errors"  # JSON: image column -> why the source gave no bytes for it
UNREADABLE_ROW = "row"  # the load_errors key saying why a whole row could not be read (a bad JSON line)
INPUT_FILES = "input_files"  # JSON list: the file each image column came from ("" for embedded bytes)
CONTROL_MAPS = "control_maps"  # the control maps written beside the outputs (sink.save_control_maps)
PROMPT = "prompt"
SOURCE_IMAGE = "source_image"  # image edited by img2img, inpaint, pix2pix
MASK_IMAGE = "mask_image"  # inpaint mask, white = repaint
PARAMS = "params"  # JSON of the row's resolved GenerationParams (+ seed)
STATUS = "status"  # "ok", "failed" or "skipped" (already written by an earlier run)
ERROR = "error"  # one-line reason when failed
IMAGE = "image"  # generated image, HWC uint8
WIDTH, HEIGHT = "width", "height"  # of the generated image
IMAGE_INDEX = "image_index"  # k-th image of the row (num_images_per_prompt)
SEED = "seed"
SAMPLER = "sampler"  # the scheduler, by the name A1111 writes
PROMPT_TOKENS = "prompt_tokens"  # tokens of the prompt, start and end tokens included
PROMPT_TRUNCATED = "prompt_truncated"  # the text encoder saw only the first tokens
GENERATE_SECONDS = "generate_s"  # this image's share of its pipeline call
OUTPUT_PATH = "output_path"
CONTROL_SCORES = "control_scores"  # evaluate: per ControlNet, how well the image follows its map
CONTROL_METRICS = "control_metrics"  # evaluate: per ControlNet, the metric of its score (edge_f1, ...)
CLIP_SCORE = "clip_score"  # evaluate: 100 * max(cos, 0) of the image and its prompt
CLIP_IMAGE_SIMILARITY = "clip_image_similarity"  # evaluate: cos of the image and its source image
CLIP_DIRECTIONAL_SIMILARITY = "clip_directional_similarity"  # evaluate: the edit against its captions' change
SCORE_COLUMNS = (CONTROL_SCORES, CONTROL_METRICS, CLIP_SCORE, CLIP_IMAGE_SIMILARITY, CLIP_DIRECTIONAL_SIMILARITY)
INPUT_CAPTION, EDITED_CAPTION = "input_caption", "edited_caption"  # an edit's before/after captions (evaluate)
DETECTOR = "detector"  # serving: the model detector the engine runs on the row's control images first

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
PLANNED = "planned"  # a dry run's row: everything checked, nothing generated
CONTROL_PREFIX = "control_image_"


def control_column(index: int) -> str:
    """Control map feeding ControlNet number `index`."""
    return f"{CONTROL_PREFIX}{index}"


def control_index(column: str) -> int | None:
    """The ControlNet a column feeds, or None for other columns."""
    return int(column.removeprefix(CONTROL_PREFIX)) if column.startswith(CONTROL_PREFIX) else None


class MissingColumnError(KeyError):
    """A stage got a batch without a column it needs."""

    def __str__(self) -> str:
        return str(self.args[0])


def require_columns(batch: Mapping, columns: Iterable[str], stage: str) -> None:
    """Raise naming the stage and each missing column, and the columns that are there."""
    missing = [c for c in columns if c not in batch]
    if missing:
        raise MissingColumnError(
            f"{stage} needs column(s) {', '.join(missing)}; the batch has {', '.join(sorted(batch))}"
        )
