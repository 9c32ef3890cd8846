"""FID between a model's outputs and the held-out set's own images, on clean-fid's Inception.

The feature extractor is `inception-2015-12-05.pt`, the TorchScript Inception-v3 that
StyleGAN2-ADA and clean-fid use (nothing is downloaded at run time: the file is named in the
config). It is fed as they feed it: uint8 NCHW images, here resized to 299 x 299 with PIL's
bicubic first (clean-fid's "clean" resize, per image), returning 2048 features per image.
The distance is Heusel et al.'s: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pixfleet.evaluation.statistics import Figure

INCEPTION_SIZE = 299


class InceptionFeatures:
    """The TorchScript feature extractor, loaded once, over batches of HWC uint8 images."""

    def __init__(self, path: str, device: str = "cpu"):
        import torch

        self.model = torch.jit.load(path, map_location=device).eval()
        self.device = device

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        batch = np.stack([np.asarray(Image.fromarray(i).resize(size, Image.Resampling.BICUBIC)) for i in images])
        pixels = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        with torch.inference_mode():
            return self.model(pixels, return_features=True).double().cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets (rows are images). The trace of (S_a S_b)^1/2 is taken as the sum
    of the square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a symmetric matrix: no
    complex parts to discard, as scipy's sqrtm of the product leaves."""
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cov_b @ root), 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def fid_figure(generated: np.ndarray, real: np.ndarray, samples: int, seed: int = 0) -> Figure:
    """FID with the 95% interval of `samples` resamples of the generated images (the set's
    statistics fixed); its count is the generated images'."""
    rng = np.random.default_rng(seed)
    resampled = [
        frechet_distance(generated[rng.integers(0, len(generated), len(generated))], real) for _ in range(samples)
    ]
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Figure(frechet_distance(generated, real), float(low), float(high), len(generated))
