"""Each metric against an independent reference on fixed inputs: torchmetrics where it has the
metric, numpy or transformers' own CLIP forward pass where it does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixfleet.engine.detectors import ade20k_palette
from pixfleet.evaluation.metrics import (
    ClipScorer,
    depth_rmse,
    edge_f1,
    ms_ssim,
    palette_labels,
    segmentation_miou,
)

pytestmark = pytest.mark.timeout(120)
RNG = np.random.default_rng(7)


def _edge_map(density: float, shape=(48, 64)) -> np.ndarray:
    edges = (RNG.random(shape) < density).astype(np.uint8) * 255
    return np.repeat(edges[:, :, None], 3, axis=2)  # as canny's map comes: three equal channels


@pytest.mark.parametrize("densities", [(0.1, 0.1), (0.3, 0.05), (0.0, 0.2), (0.0, 0.0)])
def test_edge_f1_is_torchmetrics_binary_f1(densities):
    from torchmetrics.classification import BinaryF1Score

    predicted, target = _edge_map(densities[0]), _edge_map(densities[1])
    reference = BinaryF1Score()(torch.from_numpy(predicted[..., 0] > 127), torch.from_numpy(target[..., 0] > 127))
    assert edge_f1(predicted, target) == pytest.approx(float(reference), abs=1e-6)


def test_identical_edges_score_one_and_disjoint_edges_zero():
    edges = _edge_map(0.2)
    assert edge_f1(edges, edges) == 1.0
    assert edge_f1(edges, 255 - edges) == 0.0


def test_ms_ssim_of_grey_maps_is_one_for_the_same_map_and_falls_with_the_difference():
    import cv2

    soft = cv2.GaussianBlur((RNG.random((192, 200)) * 255).astype(np.uint8), (0, 0), 3)
    as_detected = np.repeat(soft[:, :, None], 3, axis=2)  # detectors give three equal channels
    assert ms_ssim(as_detected, soft) == pytest.approx(1.0, abs=1e-5)
    slightly, very = (np.clip(soft + RNG.normal(0, s, soft.shape), 0, 255).astype(np.uint8) for s in (5, 60))
    assert 1.0 > ms_ssim(slightly, soft) > ms_ssim(very, soft) >= 0.0
    with pytest.raises(ValueError, match=r"MS-SSIM needs maps of at least 176 px a side, got 200x160"):
        ms_ssim(soft[:160], soft[:160])


def test_depth_rmse_is_the_rmse_of_the_min_max_normalised_maps():
    predicted = RNG.integers(20, 200, (32, 40), dtype=np.uint8)
    target = np.repeat(RNG.integers(0, 256, (32, 40), dtype=np.uint8)[:, :, None], 3, axis=2)

    def normalised(depth):
        depth = depth.astype(np.float64)
        return np.interp(depth, (depth.min(), depth.max()), (0.0, 255.0))

    expected = np.sqrt(((normalised(predicted) - normalised(target[..., 0])) ** 2).mean())
    assert depth_rmse(predicted, target) == pytest.approx(expected, abs=1e-6)
    # A map that differs only by scale and offset is the same depth.
    assert depth_rmse(predicted, predicted // 2 + 10) < 1.0
    assert depth_rmse(predicted, 255 - predicted) > 100


def test_segmentation_miou_against_a_confusion_matrix():
    predicted = RNG.integers(0, 6, (30, 30))
    target = RNG.integers(2, 9, (30, 30))
    target[:3] = -1  # colours outside the palette: left out

    valid = target >= 0
    confusion = np.bincount(target[valid] * 150 + predicted[valid], minlength=150 * 150).reshape(150, 150)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    expected = (intersection[union > 0] / union[union > 0]).mean()
    assert segmentation_miou(predicted, target) == pytest.approx(expected, abs=1e-12)
    assert segmentation_miou(target, target) == 1.0


def test_palette_colours_read_back_as_their_labels():
    labels = RNG.integers(0, 150, (20, 24))
    painted = ade20k_palette()[labels]
    painted[0, 0] = (1, 2, 3)  # not a palette colour
    read = palette_labels(painted)
    assert read[0, 0] == -1
    # ADE20K paints 'road' (6) and 'skyscraper' (48) alike: a map reads back as the first.
    expected = np.where(labels == 48, 6, labels)
    np.testing.assert_array_equal(read.ravel()[1:], expected.ravel()[1:])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from pixfleet.models.tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


IMAGES = [RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(4)]
PROMPTS = ["a red circle on a blue background", "green", "a photo of the square", "yellow and purple"]


def test_clip_score_is_torchmetrics_clip_score_row_by_row(clip_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Projected(CLIPModel):  # torchmetrics 1.9 expects transformers 4's tensors back
        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    model, processor = Projected.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    scores = ClipScorer(str(clip_dir)).clip_scores(IMAGES, PROMPTS)

    assert scores.shape == (4,)
    for image, prompt, score in zip(IMAGES, PROMPTS, scores, strict=True):
        metric = CLIPScore(model_name_or_path=lambda: (model, processor))
        metric.update(torch.from_numpy(image).permute(2, 0, 1), prompt)
        assert score == pytest.approx(float(metric.compute()), abs=1e-4)


def test_clip_metrics_equal_clip_forward_pass_embeddings(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)

    def embeddings(images, texts):  # CLIPModel.forward returns them normalised
        inputs = processor(
            text=texts, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77
        )
        with torch.no_grad():
            out = model(**inputs)
        return out.image_embeds, out.text_embeds

    scorer = ClipScorer(str(clip_dir))
    long_prompt = "a red circle on a blue background " * 4  # 136 byte tokens: cut at 77, its end token kept
    cut = processor.tokenizer(long_prompt, truncation=True, max_length=77)["input_ids"]
    assert len(cut) == 77 and cut[-1] == processor.tokenizer.eos_token_id
    image, text = embeddings(IMAGES[:2], [long_prompt, "green"])
    expected = 100 * (image * text).sum(-1).clamp(min=0)
    np.testing.assert_allclose(scorer.clip_scores(IMAGES[:2], [long_prompt, "green"]), expected, atol=1e-4)

    sources, edited = IMAGES[:2], IMAGES[2:]
    before, after = ["a photo of the circle", "red"], ["a photo of the square", "blue"]
    source_image, before_text = embeddings(sources, before)
    edited_image, after_text = embeddings(edited, after)
    np.testing.assert_allclose(
        scorer.image_similarity(sources, edited), (source_image * edited_image).sum(-1).numpy(), atol=1e-6
    )
    expected = torch.nn.functional.cosine_similarity(edited_image - source_image, after_text - before_text)
    np.testing.assert_allclose(scorer.directional_similarity(sources, edited, before, after), expected, atol=1e-6)
    assert scorer.directional_similarity(sources, sources, before, after).tolist() == [0.0, 0.0]  # no change
