"""Controllability, ControlNet++'s way: the detector that made a control map, run again with
the same settings on the generated image, its map compared with the one the ControlNet got."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pixfleet.config import ControlPreprocessConfig
from pixfleet.engine.detectors import load_detector
from pixfleet.evaluation.metrics import depth_rmse, edge_f1, ms_ssim, palette_labels, segmentation_miou
from pixfleet.evaluation.summary import METRIC_OF_DETECTOR


class ControllabilityScorer:
    """One ControlNet's detector, loaded once, scoring batches of (image, control map)."""

    def __init__(self, control: ControlPreprocessConfig, device):
        self.detect = load_detector(control, device)
        self.metric = METRIC_OF_DETECTOR[control.detector]

    def __call__(self, images: list[np.ndarray], control_maps: list[np.ndarray]) -> list[float]:
        detected = self.detect(images)
        return [self.compare(found, given) for found, given in zip(detected, control_maps, strict=True)]

    def compare(self, detected: np.ndarray, control_map: np.ndarray) -> float:
        if detected.shape[:2] != control_map.shape[:2]:  # the pipeline rounded the size to its VAE's multiple
            height, width = control_map.shape[:2]
            detected = np.asarray(Image.fromarray(detected).resize((width, height), Image.Resampling.NEAREST))
        if self.metric == "edge_f1":
            return edge_f1(detected, control_map)
        if self.metric == "depth_rmse":
            return depth_rmse(detected, control_map)
        if self.metric == "ms_ssim":
            return ms_ssim(detected, control_map)
        return segmentation_miou(palette_labels(detected), palette_labels(control_map))
