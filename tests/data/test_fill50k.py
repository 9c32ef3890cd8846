"""The synthetic fill50k set loads with `datasets` and is deterministic."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pixfleet.data.fill50k import COLORS, make_fill50k


def _digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_loads_with_datasets_in_the_training_layout(tmp_path):
    import datasets

    make_fill50k(tmp_path, n=6, size=32, seed=0)
    ds = datasets.load_dataset(str(tmp_path), split="train")

    assert len(ds) == 6
    assert set(ds.column_names) == {"image", "conditioning_image", "mask", "text"}
    row = ds[0]
    assert row["image"].size == (32, 32) and row["conditioning_image"].size == (32, 32)
    fill, circle, with_, background, word = row["text"].split()
    assert (circle, with_, word) == ("circle", "with", "background")
    assert fill in COLORS and background in COLORS and fill != background
    # The outline is white on black; the image holds exactly two colours.
    outline = np.asarray(row["conditioning_image"])
    assert set(np.unique(outline)) <= {0, 255} and outline.max() == 255
    image = np.asarray(row["image"])
    assert len(np.unique(image.reshape(-1, 3), axis=0)) == 2
    # The mask is the circle: white where the image has the fill colour, black elsewhere.
    mask = np.asarray(row["mask"])
    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
    assert (image[mask == 0] == image[0, 0]).all() and (image[mask == 255] != image[0, 0]).any(axis=1).all()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (make_fill50k(tmp_path / name, n=4, size=32, seed=s) for name, s in [("a", 1), ("b", 1), ("c", 2)])
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_rejects_empty_sets(tmp_path):
    with pytest.raises(ValueError, match="need n >= 1"):
        make_fill50k(tmp_path, n=0)
