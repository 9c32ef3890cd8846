"""Figures that carry their noise: a mean with its count and 95% bootstrap interval, and the
paired difference of two models on the same rows. numpy and pyarrow only (runs in tasks)."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pixfleet.engine import columns as C
from pixfleet.storage import Location

CONFIDENCE = 0.95
_CHUNK = 100  # resamples drawn at once: memory stays at 100 x rows


@dataclass(frozen=True)
class Figure:
    """A mean over `count` values with its 95% bootstrap (percentile) interval."""

    mean: float
    low: float
    high: float
    count: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.count})"

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def bootstrap_mean(values: np.ndarray, samples: int, seed: int = 0) -> Figure:
    """The mean of `values` and the interval that holds 95% of the means of `samples`
    resamples (with replacement, same size)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), (min(_CHUNK, samples - start), len(values)))].mean(axis=1)
            for start in range(0, samples, _CHUNK)
        ]
    )
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Figure(float(values.mean()), float(low), float(high), len(values))


def paired_difference(challenger: pd.Series, champion: pd.Series, samples: int, seed: int = 0) -> Figure | None:
    """challenger - champion over the images both scored (matched by index), with the interval
    of the mean difference: rows are resampled as pairs, so what every model finds hard in a
    row cancels out. None when no image was scored by both."""
    both = pd.concat([challenger, champion], axis=1, join="inner").dropna()
    if both.empty:
        return None
    return bootstrap_mean((both.iloc[:, 0] - both.iloc[:, 1]).to_numpy(), samples, seed)


def image_scores(output_dir: str) -> pd.DataFrame:
    """One column per score (`control_0.edge_f1`, `clip_score`, ...) of each ok image of a
    generation job's manifest, indexed by (source_ref, image_index): the same input row has
    the same index whatever model made the image (its row id derives from the model too)."""
    manifest = Location.of(output_dir) / "manifest.parquet"
    columns = [C.SOURCE_REF, C.IMAGE_INDEX, C.STATUS, *C.SCORE_COLUMNS]
    table = pq.read_table(io.BytesIO(manifest.read_bytes()), columns=columns).to_pandas()
    table = table[table[C.STATUS] == C.OK].set_index([C.SOURCE_REF, C.IMAGE_INDEX])
    scores = pd.DataFrame(index=table.index)
    for name in (C.CLIP_SCORE, C.CLIP_IMAGE_SIMILARITY, C.CLIP_DIRECTIONAL_SIMILARITY):
        if table[name].notna().any():
            scores[name] = table[name].astype(np.float64)
    scored = table[table[C.CONTROL_SCORES].notna()]
    if len(scored):  # one score per ControlNet, the same metrics on every row of a job
        values = np.stack(scored[C.CONTROL_SCORES].to_numpy())
        for index, metric in enumerate(scored[C.CONTROL_METRICS].iloc[0]):
            scores[f"control_{index}.{metric}"] = pd.Series(values[:, index], index=scored.index)
    return scores
