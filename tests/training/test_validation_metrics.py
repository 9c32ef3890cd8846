"""validation_metrics: the validation images' scores are the evaluation's metrics, averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixfleet.config.training import ValidationMetricsConfig
from pixfleet.engine.preprocess import detect
from pixfleet.evaluation.metrics import ClipScorer, edge_f1
from pixfleet.training.validation import ValidationRow, ValidationScorer, validation_grid
from tests.helpers import random_image

pytestmark = pytest.mark.timeout(120)


def test_validation_scores_average_the_metrics_of_every_validation_image(tmp_path):
    from pixfleet.models.tiny import make_tiny_clip

    clip = str(make_tiny_clip(tmp_path / "clip"))
    config = ValidationMetricsConfig(control={"detector": "canny"}, clip_model=clip)
    rows = [
        ValidationRow(prompt, random_image(seed, (32, 32)), [random_image(seed + k, (32, 32)) for k in (10, 20)])
        for seed, prompt in ((1, "red circle"), (2, "blue square"))
    ]

    scores = ValidationScorer(config, torch.device("cpu"))(rows)

    pairs = [(np.asarray(row.control), np.asarray(image), row.prompt) for row in rows for image in row.images]
    f1 = [edge_f1(detect(image, config.control), control) for control, image, _ in pairs]
    clip_scores = ClipScorer(clip).clip_scores([image for _, image, _ in pairs], [prompt for *_, prompt in pairs])
    assert scores == pytest.approx(
        {"validation/control_0.edge_f1": np.mean(f1), "validation/clip_score": clip_scores.mean()}
    )
    assert validation_grid(rows).size == (32 * 3, 32 * 2)


def test_validation_metrics_need_validation_images_and_a_detector():
    from pixfleet.config.training import ControlNetTrainingArgs

    with pytest.raises(ValueError, match="validation_metrics: scores the validation images"):
        ControlNetTrainingArgs(
            pretrained_model_name_or_path="x", train_data_dir=".", validation_metrics={"clip_model": "openai/clip"}
        )
    with pytest.raises(ValueError, match="name the detector that made the validation images"):
        ValidationMetricsConfig(control={"detector": "none"})
