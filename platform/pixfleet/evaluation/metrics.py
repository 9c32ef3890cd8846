"""The metrics, image by image, as the papers define them.

Controllability follows ControlNet++ (ECCV 2024): the detector that made a row's control map is
run again, with the same settings, on the generated image, and its map is compared with the
control map the ControlNet got:
- edges (canny): F1 of the per-pixel binary edge maps, torchmetrics' `BinaryF1Score`;
- depth: RMSE on the 0-255 scale, both maps min-max normalised first (as the map the ControlNet got);
- segmentation: mIoU over the ADE20K classes present in either map, labels read back from the
  palette colours;
- soft edges and line art: MS-SSIM of the grey maps, torchmetrics' definition (five scales of an
  11-pixel Gaussian window: sides of at least 176 pixels).
Prompt alignment is torchmetrics' CLIP score, 100 * max(cos, 0) of the image and prompt
embeddings; the InstructPix2Pix paper's CLIP metrics compare an edit with its input.
Images are HWC uint8 arrays, maps as the detectors return them (three equal channels for edges
and depth, palette colours for segmentation).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from pixfleet.engine.detectors import ade20k_palette
from pixfleet.evaluation.summary import MS_SSIM_MIN_SIDE

if TYPE_CHECKING:
    import torch

EDGE_LEVEL = 127  # a map's pixel is an edge above this grey level (canny writes 0 or 255)


def ms_ssim(predicted: np.ndarray, target: np.ndarray) -> float:
    """MS-SSIM of two grey maps (soft edges, line art) on the 0-255 range."""
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if min(target.shape[:2]) < MS_SSIM_MIN_SIDE:
        height, width = target.shape[:2]
        raise ValueError(f"MS-SSIM needs maps of at least {MS_SSIM_MIN_SIDE} px a side, got {width}x{height}")
    maps = [torch.from_numpy(_grey(image)).float()[None, None] for image in (predicted, target)]
    return float(multiscale_structural_similarity_index_measure(*maps, data_range=255.0))


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)


def edge_f1(predicted: np.ndarray, target: np.ndarray) -> float:
    """F1 of two edge maps: 2TP / (2TP + FP + FN), 0 when neither has an edge."""
    predicted, target = _edges(predicted), _edges(target)
    true_positives = np.count_nonzero(predicted & target)
    wrong = np.count_nonzero(predicted ^ target)
    denominator = 2 * true_positives + wrong
    return 2 * true_positives / denominator if denominator else 0.0


def depth_rmse(predicted: np.ndarray, target: np.ndarray) -> float:
    """RMSE of two depth maps on the 0-255 scale, each min-max normalised to it first."""
    difference = _normalised_depth(predicted) - _normalised_depth(target)
    return float(np.sqrt(np.mean(difference**2)))


def segmentation_miou(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean IoU over the classes present in either labelling (H x W ints; pixels labelled -1 in
    `target`, colours outside the palette, are left out)."""
    valid = target >= 0
    predicted, target = predicted[valid], target[valid]
    ious = []
    for label in np.union1d(predicted, target):
        in_predicted, in_target = predicted == label, target == label
        ious.append(np.count_nonzero(in_predicted & in_target) / np.count_nonzero(in_predicted | in_target))
    return float(np.mean(ious)) if ious else 0.0


def palette_labels(segmentation_map: np.ndarray) -> np.ndarray:
    """The ADE20K labels behind a map painted in the palette (-1 where a colour is not in it).
    The palette paints 'road' (6) and 'skyscraper' (48) alike; both read back as 6, in the
    detector's map and the control map alike."""
    codes = _colour_codes(segmentation_map)
    lookup = _palette_lookup()
    index = np.searchsorted(lookup[0], codes)
    index = np.minimum(index, len(lookup[0]) - 1)
    return np.where(lookup[0][index] == codes, lookup[1][index], -1)


@cache
def _palette_lookup() -> tuple[np.ndarray, np.ndarray]:
    codes = _colour_codes(ade20k_palette()[None])[0]
    order = np.argsort(codes, kind="stable")
    return codes[order], order


def _colour_codes(image: np.ndarray) -> np.ndarray:
    rgb = image[..., :3].astype(np.int64)
    return rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]


def _edges(edge_map: np.ndarray) -> np.ndarray:
    grey = edge_map.mean(axis=2) if edge_map.ndim == 3 else edge_map
    return grey > EDGE_LEVEL


def _normalised_depth(depth_map: np.ndarray) -> np.ndarray:
    depth = depth_map.mean(axis=2) if depth_map.ndim == 3 else depth_map.astype(np.float64)
    span = depth.max() - depth.min()
    return (depth - depth.min()) * (255.0 / span) if span > 0 else np.zeros_like(depth, dtype=np.float64)


class ClipScorer:
    """A transformers CLIP model and its processor, loaded once; embeddings in batches."""

    def __init__(self, model: str, device: str | torch.device = "cpu"):
        import transformers

        self.processor = transformers.CLIPProcessor.from_pretrained(model)
        self.model = transformers.CLIPModel.from_pretrained(model).to(device).eval()
        self.device = device
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    def image_embeddings(self, images: list[np.ndarray]):
        import torch

        with torch.inference_mode():
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return _unit(_projected(self.model.get_image_features(pixel_values=pixels.to(self.device))))

    def text_embeddings(self, texts: list[str]):
        """Each text cut at the text encoder's length, its end token kept (as pipelines cut prompts)."""
        import torch

        with torch.inference_mode():
            tokens = self.processor(
                text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens
            ).to(self.device)
            return _unit(_projected(self.model.get_text_features(**tokens)))

    def clip_scores(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """100 * max(cos, 0) of each image and its prompt."""
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return (100 * cos.clamp(min=0)).float().cpu().numpy()

    def image_similarity(self, sources: list[np.ndarray], edited: list[np.ndarray]) -> np.ndarray:
        """Cosine of each edit's image embedding with its input's (InstructPix2Pix's CLIP image similarity)."""
        return (self.image_embeddings(sources) * self.image_embeddings(edited)).sum(-1).float().cpu().numpy()

    def directional_similarity(
        self, sources: list[np.ndarray], edited: list[np.ndarray], captions: list[str], edited_captions: list[str]
    ) -> np.ndarray:
        """Cosine of the change in image embedding with the change in caption embedding
        (InstructPix2Pix's CLIP directional similarity)."""
        from torch.nn.functional import cosine_similarity

        image_change = self.image_embeddings(edited) - self.image_embeddings(sources)
        text_change = self.text_embeddings(edited_captions) - self.text_embeddings(captions)
        return cosine_similarity(image_change, text_change).float().cpu().numpy()  # 0 for no change


def _projected(output):
    """The projected embeddings: transformers 5 returns them as the output's `pooler_output`."""
    return getattr(output, "pooler_output", output)


def _unit(features):
    return features / features.norm(p=2, dim=-1, keepdim=True)
