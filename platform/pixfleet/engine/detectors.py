"""Control-map detectors with a model of their own, loaded once and run on batches.

`DepthDetector` makes the map the diffusers docs make for depth ControlNets with transformers'
`pipeline("depth-estimation")`: the model's depth resized back to the image (the image
processor's own post-processing), scaled to 0-255 per image, as three equal channels; batched,
on the GPU when there is one. (`controlnet_aux`, home of the line-art, soft-edge, M-LSD and
pose annotators, needs torchvision, which does not install beside the project's torch.)
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from pixfleet.config import ControlPreprocessConfig


class DepthDetector:
    """A transformers depth-estimation model (DPT, Depth Anything, ...) and its image processor."""

    def __init__(self, model: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = AutoModelForDepthEstimation.from_pretrained(model).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Depth maps (HWC uint8, three equal channels) of RGB images, at their own sizes."""
        maps: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.shape].append(i)  # the processor stacks only images of one size
        for indices in by_size.values():
            batch = [Image.fromarray(images[i]) for i in indices]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device, self.model.dtype)
            outputs = self.model(**inputs)
            sizes = [images[i].shape[:2] for i in indices]
            for i, result in zip(indices, self.processor.post_process_depth_estimation(outputs, sizes), strict=True):
                maps[i] = _to_map(result["predicted_depth"].float().cpu().numpy())
        return maps


def _to_map(depth: np.ndarray) -> np.ndarray:
    """Depth scaled to 0-255 per image and truncated, as the depth-estimation pipeline does."""
    span = depth.max() - depth.min()
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    gray = (scaled * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def load_detector(control: ControlPreprocessConfig, device: torch.device) -> DepthDetector:
    """The model detector `control` asks for."""
    if control.detector == "depth":
        return DepthDetector(control.model, device)
    raise ValueError(f"detector {control.detector!r} has no model")
