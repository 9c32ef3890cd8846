"""FID: the distance equals the formula as clean-fid computes it (scipy's sqrtm), and the
feature file is loaded as clean-fid's TorchScript Inception is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from pixfleet.evaluation.fid import InceptionFeatures, fid_figure, frechet_distance

pytestmark = pytest.mark.timeout(120)
RNG = np.random.default_rng(5)


def clean_fid_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """clean-fid's frechet_distance (after the stats): sqrtm of the product, real part kept."""
    mu1, mu2 = a.mean(0), b.mean(0)
    sigma1, sigma2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("shift", [0.0, 0.5, 3.0])
def test_frechet_distance_is_clean_fids(shift):
    a = RNG.normal(0, 1, (400, 12))
    b = RNG.normal(shift, 1.5, (300, 12)) @ RNG.normal(0, 0.5, (12, 12))
    assert frechet_distance(a, b) == pytest.approx(clean_fid_frechet_distance(a, b), rel=1e-6, abs=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_interval_holds_its_value_and_counts_the_generated_images():
    real, generated = RNG.normal(0, 1, (300, 8)), RNG.normal(0.3, 1, (120, 8))
    figure = fid_figure(generated, real, 50)
    assert figure.low < figure.mean < figure.high and figure.count == 120


def test_features_come_from_the_torchscript_file_at_inception_size(tmp_path):
    from pixfleet.models.tiny import make_tiny_inception

    path = make_tiny_inception(tmp_path / "inception-2015-12-05.pt")
    images = [RNG.integers(0, 256, (40 + 8 * i, 50, 3), dtype=np.uint8) for i in range(3)]
    features = InceptionFeatures(str(path))(images)
    assert features.shape == (3, 16) and features.dtype == np.float64

    resized = np.asarray(Image.fromarray(images[0]).resize((299, 299), Image.Resampling.BICUBIC))
    direct = torch.jit.load(str(path))(torch.from_numpy(resized).permute(2, 0, 1)[None], return_features=True)
    np.testing.assert_allclose(features[0], direct[0].detach().numpy(), atol=1e-6)  # batched: float noise
