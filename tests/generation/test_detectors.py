"""Model detectors (depth, segmentation): the map equals the model's direct call, in the
detector and in the job's stage (a job with a depth detector, end to end: the photos-to-images
loop in tests/annotation)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pixfleet.config import ControlPreprocessConfig, GenerationJobConfig
from pixfleet.engine import columns as C
from pixfleet.engine.detectors import DepthDetector, SegmentationDetector, ade20k_palette
from pixfleet.generation.plan import plan_stages
from pixfleet.generation.stages.detect_stage import DetectStage
from pixfleet.models.identity import ModelIdentity
from tests.helpers import random_image, tiny_job

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory) -> str:
    from pixfleet.models.tiny import make_tiny_depth_estimator

    return str(make_tiny_depth_estimator(tmp_path_factory.mktemp("dpt") / "tiny-dpt"))


def pipeline_depth(model: str, image: np.ndarray) -> np.ndarray:
    """What the diffusers docs do for a depth ControlNet: transformers' depth-estimation pipeline."""
    from transformers import pipeline

    depth = np.asarray(pipeline("depth-estimation", model=model)(Image.fromarray(image))["depth"])
    return np.stack([depth] * 3, axis=2)


def assert_same_map(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal but for float noise of batching at the 0-255 truncation (seen: 3 of 12,288 values, by 1)."""
    assert actual.shape == expected.shape
    difference = np.abs(actual.astype(int) - expected)
    assert difference.max() <= 1 and difference.mean() < 0.01


def test_depth_maps_equal_the_depth_estimation_pipeline_batched_at_any_size(depth_model):
    images = [np.asarray(random_image(seed, size)) for seed, size in ((1, (64, 64)), (2, (80, 48)), (3, (64, 64)))]
    maps = DepthDetector(depth_model, torch.device("cpu"))(images)
    for image, depth in zip(images, maps, strict=True):
        assert depth.shape == image.shape and depth.dtype == np.uint8
        assert depth.min() == 0 and depth.max() == 255
        assert_same_map(depth, pipeline_depth(depth_model, image))


@pytest.fixture(scope="module")
def segmentation_model(tmp_path_factory) -> str:
    from pixfleet.models.tiny import make_tiny_segmenter

    return str(make_tiny_segmenter(tmp_path_factory.mktemp("segformer") / "tiny-segformer"))


def model_card_segmentation(model: str, image: np.ndarray) -> np.ndarray:
    """The recipe of the segmentation ControlNet's model card: the model's labels at the image's
    size, each label painted its ADE20K colour."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    processor = AutoImageProcessor.from_pretrained(model)
    segmentor = AutoModelForSemanticSegmentation.from_pretrained(model)
    pil = Image.fromarray(image)
    with torch.no_grad():
        outputs = segmentor(processor(pil, return_tensors="pt").pixel_values)
    seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[pil.size[::-1]])[0].numpy()
    color_seg = np.zeros((*seg.shape, 3), dtype=np.uint8)
    for label, color in enumerate(ade20k_palette()):
        color_seg[seg == label, :] = color
    return color_seg


def test_segmentation_maps_equal_the_model_card_recipe_batched_at_any_size(segmentation_model, tmp_path):
    palette = ade20k_palette()
    assert palette.shape == (150, 3) and palette[0].tolist() == [120, 120, 120]  # wall
    assert palette[2].tolist() == [6, 230, 230] and palette[149].tolist() == [92, 0, 255]  # sky, flag
    images = [np.asarray(random_image(seed, size)) for seed, size in ((1, (64, 64)), (2, (80, 48)), (3, (64, 64)))]
    maps = SegmentationDetector(segmentation_model, torch.device("cpu"))(images)
    for image, segments in zip(images, maps, strict=True):
        assert segments.shape == image.shape and segments.dtype == np.uint8
        colours = {tuple(c) for c in np.unique(segments.reshape(-1, 3), axis=0)}
        assert len(colours) > 1 and colours <= {tuple(c) for c in palette}
        np.testing.assert_array_equal(segments, model_card_segmentation(segmentation_model, image))

    # A model with more labels than ADE20K's (COCO-Stuff's 171) is refused, naming the count.
    from pixfleet.models.tiny import make_tiny_segmenter

    make_tiny_segmenter(tmp_path / "coco-stuff", num_labels=171)
    with pytest.raises(ValueError, match="has 171 labels; the segmentation ControlNets take ADE20K's 150"):
        SegmentationDetector(str(tmp_path / "coco-stuff"), torch.device("cpu"))


def _depth_job(tiny_dir, depth_model, tmp_path, **sections) -> GenerationJobConfig:
    control = {"detector": "depth", "model": depth_model}
    return tiny_job(
        tiny_dir,
        "controlnet",
        tmp_path,
        tmp_path / "out",
        preprocess={"width": 64, "height": 64, "control": [control]},
        **sections,
    )


def test_the_detect_stage_makes_the_maps_and_fails_only_rows_the_detector_refuses(tiny_dir, depth_model, tmp_path):
    job = _depth_job(tiny_dir, depth_model, tmp_path)
    planned = plan_stages(job, {"control_image_0": "image"}, ModelIdentity.of(job.model), frozenset())
    assert [getattr(p.fn, "__name__", None) for p in planned][1:4] == [
        "PreprocessStage",
        "DetectStage",
        "GenerateStage",
    ]
    detect = DetectStage({"control_image_0": job.preprocess.control[0]})
    images = [np.asarray(random_image(seed)) for seed in range(3)]
    batch = pd.DataFrame(
        {C.ROW_ID: ["a", "b", "c"], C.STATUS: [C.OK] * 3, C.ERROR: [""] * 3, "control_image_0": images}
    )
    out = detect(batch)
    for image, depth in zip(images, out["control_image_0"], strict=True):
        assert_same_map(depth, pipeline_depth(depth_model, image))

    # An input the model cannot take (one channel here) fails its row alone, with the reason.
    batch.at[1, "control_image_0"] = images[1][:, :, 0]
    out = detect(batch)
    assert list(out[C.STATUS]) == [C.OK, C.FAILED, C.OK]
    assert out.at[1, C.ERROR].startswith("depth detector: ")
    assert_same_map(out.at[2, "control_image_0"], pipeline_depth(depth_model, images[2]))


def test_a_depth_detector_needs_a_model_and_serving_holds_it_for_requests(tiny_dir, depth_model):
    from pydantic import ValidationError

    from pixfleet.config.serving import ServedModelConfig
    from tests.helpers import tiny_spec

    with pytest.raises(ValidationError, match="detector 'depth' needs 'model'"):
        ControlPreprocessConfig(detector="depth")
    with pytest.raises(ValidationError, match="detector 'canny' takes no 'model'"):
        ControlPreprocessConfig(detector="canny", model=depth_model)
    spec = tiny_spec(tiny_dir, "controlnet")
    depth = {"detector": "depth", "model": depth_model}
    with pytest.raises(ValidationError, match=r"control: a model detector runs in the engine process when a request"):
        ServedModelConfig(name="m", model=spec, control=[depth])
    with pytest.raises(ValidationError, match=r"detectors: canny needs no model; give it in `control`"):
        ServedModelConfig(name="m", model=spec, detectors=[{"detector": "canny"}])
    with pytest.raises(ValidationError, match=r"detectors: each detector once \(depth, depth\)"):
        ServedModelConfig(name="m", model=spec, detectors=[depth, depth])
    assert ServedModelConfig(name="m", model=spec, detectors=[depth]).detectors[0].model == depth_model
