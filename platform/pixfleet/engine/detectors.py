"""Control-map detectors, loaded once and run on batches of RGB images (HWC uint8).

- `DepthDetector` makes the map the diffusers docs make for depth ControlNets with transformers'
  `pipeline("depth-estimation")`: the model's depth resized back to the image (the image
  processor's own post-processing), scaled to 0-255 per image, as three equal channels.
- `SegmentationDetector` makes the map of the segmentation ControlNets' model cards: a
  transformers semantic-segmentation model's labels at the image's size (the processor's
  post-processing), each painted its ADE20K palette colour, the palette those ControlNets were
  trained on.
- `AnnotatorDetector` runs ControlNet 1.1's annotators (line art, soft edge, scribble, M-LSD,
  OpenPose, normals) as `controlnet_aux` calls them, with the settings sd-webui-controlnet
  records, so each map equals controlnet_aux's own.
- `EdgeDetector` wraps the model-free detectors (canny, shuffle, tile), so a stage runs every
  kind alike.

Model detectors are loaded once per actor, on the GPU when there is one, and run batched: the
transformers ones through their image processor; the annotators, on a GPU, as controlnet_aux's
own per-image calls made side by side with their networks' forwards batched (`engine/lockstep.py`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from functools import cache
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixfleet.config import ControlPreprocessConfig
from pixfleet.config.generation import ANNOTATOR_DETECTORS
from pixfleet.engine.lockstep import Lockstep
from pixfleet.engine.preprocess import at_size, detect

Detector = Callable[[list[np.ndarray]], list[np.ndarray]]


@cache
def ade20k_palette() -> np.ndarray:
    """(150, 3) uint8: the colour of each ADE20K class, in label order."""
    table = json.loads((Path(__file__).parent / "ade20k.json").read_text())
    return np.asarray(table["palette"], dtype=np.uint8)


class _ModelDetector:
    """A transformers vision model and its image processor; images of one size go through the
    processor together (it stacks only equal sizes), each map comes back at its image's size."""

    auto_class: str

    def __init__(self, model: str, device: torch.device):
        import transformers

        self.processor = transformers.AutoImageProcessor.from_pretrained(model)
        self.model = getattr(transformers, self.auto_class).from_pretrained(model).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        maps: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            by_size[image.shape].append(i)
        for indices in by_size.values():
            batch = [Image.fromarray(images[i]) for i in indices]
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device, self.model.dtype)
            outputs = self.model(**inputs)
            sizes = [images[i].shape[:2] for i in indices]
            for i, result in zip(indices, self.post_process(outputs, sizes), strict=True):
                maps[i] = result
        return maps

    def post_process(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        raise NotImplementedError


class DepthDetector(_ModelDetector):
    """A transformers depth-estimation model (DPT, Depth Anything, ...)."""

    auto_class = "AutoModelForDepthEstimation"

    def post_process(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        results = self.processor.post_process_depth_estimation(outputs, sizes)
        return [_depth_map(result["predicted_depth"].float().cpu().numpy()) for result in results]


class SegmentationDetector(_ModelDetector):
    """A transformers semantic-segmentation model trained on ADE20K's 150 classes (UperNet,
    SegFormer, ...)."""

    auto_class = "AutoModelForSemanticSegmentation"

    def __init__(self, model: str, device: torch.device):
        super().__init__(model, device)
        labels = self.model.config.num_labels
        if labels > len(ade20k_palette()):
            raise ValueError(
                f"segmentation model {model} has {labels} labels; the segmentation ControlNets take "
                f"ADE20K's {len(ade20k_palette())} classes in their palette colours: use a model trained on ADE20K"
            )

    def post_process(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        return [ade20k_palette()[label.cpu().numpy()] for label in labels]


def _depth_map(depth: np.ndarray) -> np.ndarray:
    """Depth scaled to 0-255 per image and truncated, as the depth-estimation pipeline does."""
    span = depth.max() - depth.min()
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    gray = (scaled * 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


class AnnotatorDetector:
    """A controlnet_aux annotator, its weights from `control.model`, called with `control`'s
    settings; each map at its image's size.

    On a GPU the calls for a batch's images run side by side and their networks' forwards go
    as one batch (`batch_forwards`). On a CPU they run one after another: there batching made
    0.53-1.09x the rows/s of the calls one by one (`benchmarks/annotator_batching.py`, 2 cores).
    """

    def __init__(self, control: ControlPreprocessConfig, device: torch.device, batch_forwards: bool | None = None):
        from pixfleet.models.annotators import ANNOTATORS, load_annotator

        self.annotator = load_annotator(control.detector, control.model).to(device)
        self.options = annotator_options(control)
        if batch_forwards is None:
            batch_forwards = device.type == "cuda"
        self.lockstep = Lockstep() if batch_forwards else None
        if self.lockstep:
            for file in ANNOTATORS[control.detector].files:
                owner, _, name = file.network.rpartition(".")
                holder = attrgetter(owner)(self.annotator) if owner else self.annotator
                setattr(holder, name, self.lockstep.batched(getattr(holder, name)))

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.lockstep:
            return self.lockstep.map(self.detect, images)
        return [self.detect(image) for image in images]

    def detect(self, image: np.ndarray) -> np.ndarray:
        found = self.annotator(image, image_resolution=min(image.shape[:2]), output_type="np", **self.options)
        return at_size(found, image.shape[:2])


def annotator_options(control: ControlPreprocessConfig) -> dict[str, Any]:
    """The keyword arguments of controlnet_aux's call for `control`'s detector and settings."""
    options: dict[str, Any] = {"detect_resolution": control.detect_resolution}
    if control.detector == "lineart":
        options["coarse"] = control.coarse
    if control.detector in ("softedge_hed", "softedge_pidinet"):
        options["safe"] = control.safe
    if control.detector == "scribble_hed":
        options["scribble"] = True
    if control.detector == "mlsd":
        options |= {"thr_v": control.mlsd_value_threshold, "thr_d": control.mlsd_distance_threshold}
    if control.detector == "openpose":
        options |= {
            "include_body": control.include_body,
            "include_hand": control.include_hand,
            "include_face": control.include_face,
        }
    return options


class EdgeDetector:
    """A model-free detector (canny, shuffle, tile) over a batch, image by image."""

    def __init__(self, control: ControlPreprocessConfig):
        self.control = control

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [detect(image, self.control) for image in images]


MODEL_DETECTOR_CLASSES = {"depth": DepthDetector, "segmentation": SegmentationDetector}


def load_detector(control: ControlPreprocessConfig, device: torch.device) -> Detector:
    """The detector `control` asks for, its model (if any) loaded on `device`."""
    if control.detector in ANNOTATOR_DETECTORS:
        return AnnotatorDetector(control, device)
    if control.uses_model:
        return MODEL_DETECTOR_CLASSES[control.detector](control.model, device)
    return EdgeDetector(control)
