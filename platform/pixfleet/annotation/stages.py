"""The annotate plan's own stages; detection is the generation plan's detect stage.

    source    photo bytes, caption from the source          (read tasks)
    prepare   photo array, row id, size filters, hash       (CPU tasks)
    detect    control map                                   (actor pool, GPU or CPU)
    check     map coverage filter                           (CPU tasks)
    caption   captions the source lacks                     (actor pool, when caption.model is set)
    write     images/<id>.png, conditioning_images/<id>.png (CPU tasks)
    record    near-duplicates dropped, every row's record   (one actor: the folder's one writer)

Rows the filters keep out get status 'filtered' with the reason and carry no images further;
the record stage finds near-duplicates among the kept rows and records every row in a part
(`dataset.py`); the driver gets each row's status, and counts.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Container
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import ray.data
from PIL import Image

from pixfleet.annotation.dataset import COVERAGE, FILTERED, IMAGES_DIR, MAPS_DIR, PHASH, TEXT, Records
from pixfleet.config.annotation import AnnotateJobConfig, CaptionConfig
from pixfleet.engine import columns as C
from pixfleet.engine.images import RowError, decode_image, empty_image
from pixfleet.errors import one_line
from pixfleet.generation.stages import LIGHT_CPU, PlannedStage
from pixfleet.storage import Location

MAP = C.control_column(0)  # the detect stage's input (the photo) and output (its map)


def content_id(data: bytes) -> str:
    """A row id from the photo's bytes: identical files share it (and are kept once)."""
    return hashlib.sha256(data).hexdigest()[:24]


def perceptual_hash(image: np.ndarray) -> str:
    """The DCT hash: the 8x8 lowest frequencies of the 32x32 grey image against their median.
    Resized, re-encoded or slightly edited copies land a few bits apart."""
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term only says how bright the image is
    return f"{int(''.join('1' if bit else '0' for bit in bits), 2):016x}"


def map_coverage(control_map: np.ndarray) -> float:
    """Fraction of pixels differing from the most common value: the edge pixels of an edge map,
    0 for a flat depth map. Each pixel's channels are packed into one integer, so counting the
    values is a sort of integers (a row-wise unique over channels took 40 times as long)."""
    pixels = control_map.reshape(-1, control_map.shape[-1]).astype(np.uint32)
    packed = pixels[:, 0]
    for channel in range(1, pixels.shape[1]):
        packed = (packed << 8) | pixels[:, channel]
    _, counts = np.unique(packed, return_counts=True)
    return float(1 - counts.max() / packed.size)


def _without_images(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, C.SOURCE_IMAGE: empty_image(), MAP: empty_image()}


class PrepareStage:
    """Decode, size filters, resize to the training resolution, hash; the caption from the
    source or the template. Run as tasks."""

    def __init__(self, job: AnnotateJobConfig, finished_row_ids: Container[str]):
        self.job = job
        self.finished_row_ids = finished_row_ids
        self.needs = (C.SOURCE_REF, C.ROW_PARAMS, C.LOAD_ERRORS, C.INPUT_FILES, C.SOURCE_IMAGE)

    @classmethod
    def plan(cls, job: AnnotateJobConfig, finished_row_ids: Container[str]) -> PlannedStage:
        stage = cls(job, finished_row_ids)
        adds = (C.ROW_ID, C.STATUS, C.ERROR, TEXT, PHASH, C.WIDTH, C.HEIGHT, MAP)
        return PlannedStage(stage, stage.needs, adds, {"num_cpus": LIGHT_CPU})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "prepare stage")
        return pd.DataFrame([self._row(row) for row in batch.to_dict("records")])

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        data = row[C.SOURCE_IMAGE]
        out = {
            C.SOURCE_REF: row[C.SOURCE_REF],
            C.INPUT_FILES: row[C.INPUT_FILES],
            C.ROW_ID: content_id(data) if data else content_id(f"source:{row[C.SOURCE_REF]}".encode()),
            C.STATUS: C.OK,
            C.ERROR: "",
            TEXT: self._caption(row),
            PHASH: "",
            C.WIDTH: 0,
            C.HEIGHT: 0,
        }
        if out[C.ROW_ID] in self.finished_row_ids:
            return _without_images({**out, C.STATUS: C.SKIPPED})
        try:
            load_errors = json.loads(row[C.LOAD_ERRORS])
            if C.UNREADABLE_ROW in load_errors:
                raise RowError(load_errors[C.UNREADABLE_ROW])
            if data is None:
                raise RowError(f"image: {load_errors.get(C.SOURCE_IMAGE, 'missing')}")
            image = decode_image(data, "image", self.job.max_image_pixels)
        except RowError as error:
            return _without_images({**out, C.STATUS: C.FAILED, C.ERROR: str(error)})
        reason = self._filtered_by_size(image.shape[1], image.shape[0])
        if reason:
            return _without_images({**out, C.STATUS: FILTERED, C.ERROR: reason})
        image = self._resized(image)
        out[C.HEIGHT], out[C.WIDTH] = image.shape[:2]
        out[PHASH] = perceptual_hash(image)
        return {**out, C.SOURCE_IMAGE: image, MAP: image}

    def _caption(self, row: dict[str, Any]) -> str:
        caption = self.job.caption
        own = json.loads(row[C.ROW_PARAMS]).get("prompt")
        text = "" if caption.overwrite or own is None else str(own).strip()
        if not text and caption.template is not None:
            files = json.loads(row[C.INPUT_FILES])
            path = PurePosixPath(files[0] if files and files[0] else row[C.SOURCE_REF])
            text = caption.template.format(stem=path.stem, parent=path.parent.name)
        return text

    def _filtered_by_size(self, width: int, height: int) -> str | None:
        filters = self.job.filters
        if min(width, height) < filters.min_size:
            return f"{width}x{height} is smaller than filters.min_size={filters.min_size}"
        ratio = max(width, height) / min(width, height)
        if filters.max_aspect_ratio and ratio > filters.max_aspect_ratio:
            limit = filters.max_aspect_ratio
            return f"{width}x{height}: aspect ratio {ratio:.2f} over filters.max_aspect_ratio={limit}"
        return None

    def _resized(self, image: np.ndarray) -> np.ndarray:
        size = self.job.resolution
        height, width = image.shape[:2]
        if size is None or min(width, height) == size:
            return image
        scale = size / min(width, height)
        target = (max(size, round(width * scale)), max(size, round(height * scale)))
        return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.LANCZOS))


class CheckMapStage:
    """The map coverage filter (CPU tasks)."""

    def __init__(self, min_coverage: float):
        self.min_coverage = min_coverage
        self.needs = (C.STATUS, C.ERROR, MAP, C.SOURCE_IMAGE)

    @classmethod
    def plan(cls, min_coverage: float) -> PlannedStage:
        stage = cls(min_coverage)
        return PlannedStage(stage, stage.needs, (COVERAGE,), {"num_cpus": LIGHT_CPU})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "check stage")
        rows = []
        for row in batch.to_dict("records"):
            row[COVERAGE] = map_coverage(row[MAP]) if row[C.STATUS] == C.OK else 0.0
            if row[C.STATUS] == C.OK and row[COVERAGE] < self.min_coverage:
                reason = f"control map nearly empty: {row[COVERAGE]:.2%} of pixels, under filters.min_map_coverage"
                row = _without_images({**row, C.STATUS: FILTERED, C.ERROR: f"{reason}={self.min_coverage}"})
            rows.append(row)
        return pd.DataFrame(rows)


class CaptionStage:
    """Captions for the rows still without one (actor pool, one model per actor)."""

    def __init__(self, config: CaptionConfig):
        import torch

        from pixfleet.engine.captions import Captioner

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.captioner = Captioner(config.model, device, config.max_new_tokens, config.prompt)
        self.needs = self.columns_needed()

    @classmethod
    def plan(cls, job: AnnotateJobConfig) -> PlannedStage:
        resources = job.resources
        options = {
            "fn_constructor_args": (job.caption,),
            "batch_size": resources.batch_size,
            "num_cpus": resources.num_cpus_per_captioner,
            "num_gpus": resources.num_gpus_per_captioner,
            "compute": ray.data.ActorPoolStrategy(size=resources.caption_actors),
        }
        return PlannedStage(cls, cls.columns_needed(), (), options)

    @staticmethod
    def columns_needed() -> tuple[str, ...]:
        return (C.STATUS, C.ERROR, TEXT, C.SOURCE_IMAGE)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "caption stage")
        batch = batch.copy()
        rows = batch.index[(batch[C.STATUS] == C.OK) & (batch[TEXT] == "")]
        if len(rows) == 0:
            return batch
        try:
            captions = self.captioner(list(batch.loc[rows, C.SOURCE_IMAGE]))
        except Exception:  # find the rows it cannot caption; the others keep theirs
            captions = [self._one(batch, row) for row in rows]
        for row, caption in zip(rows, captions, strict=True):
            if caption is not None:
                batch.at[row, TEXT] = caption
        return batch

    def _one(self, batch: pd.DataFrame, row) -> str | None:
        try:
            return self.captioner([batch.at[row, C.SOURCE_IMAGE]])[0]
        except Exception as error:
            batch.at[row, C.STATUS] = C.FAILED
            batch.at[row, C.ERROR] = f"captioner: {one_line(error)}"
            return None


class WriteStage:
    """Photo and map as PNGs named by row id, written atomically (CPU tasks, fused with the check
    stage: the same CPU share lets Ray Data run them as one task, which it schedules as blocks
    leave the detector; on their own, the writes waited for the detector to finish); the
    arrays stay here, the driver gets the rows' records."""

    def __init__(self, output_dir: str):
        self.root = Location.of(output_dir)
        self.needs = (C.ROW_ID, C.STATUS, C.ERROR, TEXT, C.SOURCE_IMAGE, MAP)

    @classmethod
    def plan(cls, output_dir: str) -> PlannedStage:
        stage = cls(output_dir)
        return PlannedStage(stage, stage.needs, (), {"num_cpus": LIGHT_CPU})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "write stage")
        records = []
        for row in batch.to_dict("records"):
            if row[C.STATUS] == C.OK and not row[TEXT]:
                row[C.STATUS] = C.FAILED
                row[C.ERROR] = "no caption: the source has none; set caption.model or caption.template"
            if row[C.STATUS] == C.OK:
                self._write(row[C.ROW_ID], row[C.SOURCE_IMAGE], row[MAP])
            records.append({k: v for k, v in row.items() if k not in (C.SOURCE_IMAGE, MAP)})
        return pd.DataFrame(records)

    def _write(self, row_id: str, image: np.ndarray, control_map: np.ndarray) -> None:
        for folder, array in ((IMAGES_DIR, image), (MAPS_DIR, control_map)):
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            (self.root / folder / f"{row_id}.png").write_bytes(buffer.getvalue())


class RecordStage:
    """The folder's one writer of records (an actor pool of one, so rows are compared with every
    row kept before them): near-duplicates dropped, each block's rows recorded in a part
    (`dataset.Records`). The driver gets each row's status and reason."""

    needs = (C.ROW_ID, C.STATUS, C.ERROR, C.SOURCE_REF, TEXT, C.WIDTH, C.HEIGHT, PHASH, COVERAGE)
    returns = (C.ROW_ID, C.STATUS, C.ERROR, C.SOURCE_REF)

    def __init__(self, output_dir: str, near_duplicate_distance: int | None):
        self.records = Records(Location.of(output_dir), near_duplicate_distance)

    @classmethod
    def plan(cls, job: AnnotateJobConfig) -> PlannedStage:
        options = {
            "fn_constructor_args": (job.output_dir, job.filters.near_duplicate_distance),
            "num_cpus": LIGHT_CPU,
            "compute": ray.data.ActorPoolStrategy(size=1),
        }
        return PlannedStage(cls, cls.needs, (), options)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "record stage")
        rows = self.records.record(batch.to_dict("records"))
        return pd.DataFrame(rows, columns=list(batch.columns))[list(self.returns)]
