"""FID of every model's outputs against the held-out set's own images: one task, the Inception
features extracted once per image (the set's once for all models)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import ray.data

from pixfleet.engine import columns as C
from pixfleet.engine.images import RowError, decode_image
from pixfleet.evaluation.fid import InceptionFeatures, fid_figure
from pixfleet.evaluation.statistics import Figure
from pixfleet.storage import Location

BATCH = 32
MAX_PIXELS = 64 << 20  # the set's images are photos of any size; Inception sees 299 x 299


def model_fids(inception: str, real: ray.data.Dataset, outputs: dict[str, str], samples: int) -> dict[str, Figure]:
    """{model: FID of its ok images against the images of `real` (canonical rows, their
    source_image column)}. Images that do not decode are left out of either side."""
    import torch

    extract = InceptionFeatures(inception, "cuda" if torch.cuda.is_available() else "cpu")
    reference = _features(extract, _set_images(real))
    return {
        model: fid_figure(_features(extract, _outputs(output)), reference, samples)
        for model, output in outputs.items()
    }


def _set_images(dataset: ray.data.Dataset) -> Iterator[np.ndarray]:
    for batch in dataset.iter_batches(batch_format="pandas", batch_size=BATCH):
        for data in batch[C.SOURCE_IMAGE]:
            try:
                yield decode_image(data, "fid.image_column", MAX_PIXELS)
            except RowError:
                continue


def _outputs(output_dir: str) -> Iterator[np.ndarray]:
    manifest = Location.of(output_dir) / "manifest.parquet"
    table = pq.read_table(io.BytesIO(manifest.read_bytes()), columns=[C.STATUS, C.OUTPUT_PATH])
    for status, path in zip(table.column(C.STATUS).to_pylist(), table.column(C.OUTPUT_PATH).to_pylist(), strict=True):
        if status == C.OK:
            yield decode_image(Location.of(path).read_bytes(), path, MAX_PIXELS)


def _features(extract: InceptionFeatures, images: Iterator[np.ndarray]) -> np.ndarray:
    batches, batch = [], []
    for image in images:
        batch.append(image)
        if len(batch) == BATCH:
            batches.append(extract(batch))
            batch = []
    if batch:
        batches.append(extract(batch))
    return np.concatenate(batches)
