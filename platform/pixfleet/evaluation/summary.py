"""A job's scores summed up from its manifest: mean and percentiles of each, for MLflow and the
job's summary. Runs in the merge task (numpy and pyarrow only), which reads every record once."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from pixfleet.engine import columns as C

PERCENTILES = (5, 50, 95)
# The controllability metric of each detector's maps, as ControlNet++ measures them.
METRIC_OF_DETECTOR = {
    "canny": "edge_f1",
    "depth": "depth_rmse",
    "segmentation": "segmentation_miou",
    **dict.fromkeys(("lineart", "lineart_anime", "softedge_hed", "softedge_pidinet"), "ms_ssim"),
}
MS_SSIM_MIN_SIDE = 176  # torchmetrics' MS-SSIM: each side // 16 must exceed its window's 10 pixels
# Each metric, and whether a
# higher value is better: the image follows its map, or its prompt, more closely.
HIGHER_IS_BETTER = {
    "edge_f1": True,
    "depth_rmse": False,
    "segmentation_miou": True,
    "ms_ssim": True,
    "clip_score": True,
    "clip_image_similarity": True,
    "clip_directional_similarity": True,
    "fid": False,
}


class ScoreTally:
    """The scores of the merged records, one float array per score, kept in the merge task."""

    def __init__(self):
        self.values: dict[str, list[np.ndarray]] = defaultdict(list)

    def add(self, table: pa.Table) -> None:
        for name in (C.CLIP_SCORE, C.CLIP_IMAGE_SIMILARITY, C.CLIP_DIRECTIONAL_SIMILARITY):
            column = table.column(name).drop_null()
            if len(column):
                self.values[name].append(column.to_numpy())
        scores, metrics = table.column(C.CONTROL_SCORES).to_pylist(), table.column(C.CONTROL_METRICS).to_pylist()
        by_name: dict[str, list[float]] = defaultdict(list)
        for row_scores, row_metrics in zip(scores, metrics, strict=True):
            for index, (score, metric) in enumerate(zip(row_scores or (), row_metrics or (), strict=True)):
                by_name[f"control_{index}.{metric}"].append(score)
        for name, values in by_name.items():
            self.values[name].append(np.asarray(values, dtype=np.float64))

    def summary(self) -> dict[str, dict[str, float]]:
        """{score: {count, mean, p5, p50, p95}} over the records that have it."""
        result = {}
        for name, parts in sorted(self.values.items()):
            values = np.concatenate(parts)
            stats = {"count": float(len(values)), "mean": float(values.mean())}
            stats |= {f"p{q}": float(p) for q, p in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)}
            result[name] = stats
        return result


def control_badness(scores, metrics) -> float | None:
    """How little an image follows its first ControlNet's map, larger for worse (its score,
    negated where higher is better); None without scores."""
    if scores is None or metrics is None or not len(scores):
        return None
    return -float(scores[0]) if HIGHER_IS_BETTER[metrics[0]] else float(scores[0])


def greater_is_better(score: str) -> bool:
    """The direction of a score by its name (`control_0.edge_f1`, `clip_score`)."""
    metric = score.rsplit(".", 1)[-1]
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"{score}: not a score pixfleet computes ({', '.join(HIGHER_IS_BETTER)})")
    return HIGHER_IS_BETTER[metric]
