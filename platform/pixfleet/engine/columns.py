"""Column names: the interface between generation stages, and the check every stage runs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ROW_ID = "row_id"  # stable id: from the source, or a content hash (see params.row_id_for)
SOURCE_REF = "source_ref"  # where the row came from, for error messages ("file.jsonl:12")
PROMPT = "prompt"
SOURCE_IMAGE = "source_image"  # image edited by img2img, inpaint, pix2pix
MASK_IMAGE = "mask_image"  # inpaint mask, white = repaint
PARAMS = "params"  # JSON of the row's resolved GenerationParams (+ seed)
STATUS = "status"  # "ok", "failed" or "skipped" (already written by an earlier run)
ERROR = "error"  # one-line reason when failed
IMAGE = "image"  # generated image, HWC uint8
IMAGE_INDEX = "image_index"  # k-th image of the row (num_images_per_prompt)
SEED = "seed"
GENERATE_SECONDS = "generate_s"
OUTPUT_PATH = "output_path"

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


def control_column(index: int) -> str:
    """Control map feeding ControlNet number `index`."""
    return f"control_image_{index}"


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
