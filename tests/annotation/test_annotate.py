"""`pixfleet annotate`: photos in, an imagefolder training set out; filters, captions, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pixfleet.annotation.dataset import SettingsChanged
from pixfleet.annotation.job import run_annotation
from pixfleet.annotation.stages import map_coverage, perceptual_hash
from pixfleet.config import ConfigError
from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.data.fill50k import fill50k_row

pytestmark = pytest.mark.timeout(240)


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Six distinct circle photos in two folders, and one of each kind a filter drops or fails."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for i in range(6):
        image, _, _ = fill50k_row(rng, 64)
        save(image, root / ("cats" if i < 3 else "dogs") / f"{i}.png")
    (root / "cats" / "0_copy.png").write_bytes((root / "cats" / "0.png").read_bytes())  # identical file
    resized = Image.open(root / "dogs" / "4.png").resize((72, 72), Image.Resampling.BICUBIC)
    save(resized, root / "dogs" / "4_resized.jpg", quality=90)  # a near-duplicate
    save(Image.new("RGB", (20, 20), (200, 0, 0)), root / "small.png")
    save(Image.new("RGB", (160, 40), (0, 200, 0)), root / "wide.png")
    save(Image.new("RGB", (64, 64), (90, 90, 90)), root / "blank.png")  # no edges at all
    (root / "broken.png").write_bytes(b"not an image")
    return root


def annotate_job(photos: Path, out: Path, **overrides) -> AnnotateJobConfig:
    return AnnotateJobConfig.model_validate(
        {
            "source": {"path": str(photos)},
            "detector": {"detector": "canny", "low_threshold": 50, "high_threshold": 100},
            "resolution": 48,
            "caption": {"template": "a photo of a {parent} named {stem}"},
            "filters": {
                "min_size": 32,
                "max_aspect_ratio": 2.5,
                "near_duplicate_distance": 6,
                "min_map_coverage": 0.01,
            },
            "output_dir": str(out),
            "max_failed_fraction": 0.5,
            "tracking": {"enabled": False},
            **overrides,
        }
    )


def test_the_perceptual_hash_finds_resized_and_reencoded_copies():
    rng = np.random.default_rng(0)
    image, _, _ = fill50k_row(rng, 64)
    other, _, _ = fill50k_row(rng, 64)
    buffer = io.BytesIO()
    image.resize((96, 96)).save(buffer, format="JPEG", quality=80)
    copy = np.asarray(Image.open(buffer).convert("RGB"))

    def bits_apart(a, b) -> int:
        return (int(perceptual_hash(np.asarray(a)), 16) ^ int(perceptual_hash(np.asarray(b)), 16)).bit_count()

    assert bits_apart(image, copy) <= 4
    assert bits_apart(image, other) >= 12


def test_map_coverage_is_the_share_of_pixels_off_the_background():
    edges = np.zeros((10, 10, 3), np.uint8)
    edges[2, :5] = 255
    assert map_coverage(edges) == pytest.approx(0.05)
    assert map_coverage(np.full((4, 4, 3), 128, np.uint8)) == 0.0


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("ray_session")
def test_annotate_writes_a_training_set_with_filters_and_resumes_without_repeating_rows(photos, tmp_path):
    out = tmp_path / "set"
    summary = run_annotation(annotate_job(photos, out))
    assert (summary.rows_in, summary.rows_ok, summary.rows_filtered, summary.rows_failed) == (12, 6, 5, 1)
    assert summary.filtered_by == {
        "duplicate": 1,
        "near-duplicate": 1,
        "too small": 1,
        "aspect ratio": 1,
        "empty map": 1,
    }

    # Every row in the manifest, with the reason it was kept out.
    manifest = {Path(r["source_ref"]).name: r for r in json_lines(out / "manifest.jsonl")}
    assert len(manifest) == 12
    reasons = {name: r["error"] for name, r in manifest.items() if r["status"] != "ok"}
    assert reasons["0_copy.png"].startswith(f"duplicate of {photos / 'cats' / '0.png'}")
    assert reasons["4_resized.jpg"].startswith(f"near-duplicate of {photos / 'dogs' / '4.png'} (")
    assert reasons["small.png"] == "20x20 is smaller than filters.min_size=32"
    assert reasons["wide.png"] == "160x40: aspect ratio 4.00 over filters.max_aspect_ratio=2.5"
    assert reasons["blank.png"].startswith("control map nearly empty: 0.00% of pixels")
    assert reasons["broken.png"] == "image: cannot decode image (not a format Pillow reads)"

    # The imagefolder: photos at the training resolution, their canny maps, template captions.
    metadata = json_lines(out / "metadata.jsonl")
    assert len(metadata) == 6
    by_name = {r["row_id"]: name for name, r in manifest.items() if r["status"] == "ok"}
    for line in metadata:
        photo = np.asarray(Image.open(out / line["file_name"]))
        control = np.asarray(Image.open(out / line["conditioning_image_file_name"]))
        assert photo.shape == (48, 48, 3) and control.shape == (48, 48, 3)
        np.testing.assert_array_equal(control[:, :, 0], cv2.Canny(photo, 50, 100))
        name = by_name[Path(line["file_name"]).stem]
        parent = "cats" if int(name[0]) < 3 else "dogs"
        assert line["text"] == f"a photo of a {parent} named {Path(name).stem}"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(m["file_name"]).name for m in metadata)
    assert not (out / "records").exists() or not list((out / "records").iterdir())  # merged, then removed

    # `datasets` and `pixfleet train` read it as an imagefolder.
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(loaded) == 6 and {"image", "conditioning_image", "text"} <= set(loaded.column_names)

    # A rerun skips what is recorded and lists nothing twice.
    again = run_annotation(annotate_job(photos, out))
    assert (again.rows_skipped, again.rows_ok, again.rows_failed) == (11, 0, 1)
    assert json_lines(out / "metadata.jsonl") == metadata
    assert len(json_lines(out / "manifest.jsonl")) == 13  # the failed row, recorded again

    # Other settings in the same folder would mix two data sets: refused.
    with pytest.raises(SettingsChanged, match="holds rows annotated with other detector"):
        run_annotation(annotate_job(photos, out, resolution=32))


def test_captions_equal_the_models_own_generate_per_image(tmp_path):
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from pixfleet.engine.captions import Captioner
    from pixfleet.models.tiny import make_tiny_captioner

    model = str(make_tiny_captioner(tmp_path / "blip"))
    rng = np.random.default_rng(3)
    images = [np.asarray(fill50k_row(rng, size)[0]) for size in (64, 48, 80)]
    captions = Captioner(model, torch.device("cpu"), max_new_tokens=6)(images)
    processor, blip = AutoProcessor.from_pretrained(model), BlipForConditionalGeneration.from_pretrained(model)
    for image, caption in zip(images, captions, strict=True):
        tokens = blip.generate(**processor(images=Image.fromarray(image), return_tensors="pt"), max_new_tokens=6)
        assert caption == processor.decode(tokens[0], skip_special_tokens=True).strip()
        assert len(caption.split()) >= 3


def test_annotate_configs_are_checked_before_anything_runs(photos, tmp_path):
    with pytest.raises(ValueError, match="'none' makes no control map"):
        annotate_job(photos, tmp_path, detector={"detector": "none"})
    with pytest.raises(ValueError, match=r"template field \{name\} is not one of"):
        annotate_job(photos, tmp_path, caption={"template": "a {name}"})
    with pytest.raises(ValueError, match=r"set caption\.model or caption\.template, not both"):
        annotate_job(photos, tmp_path, caption={"template": "a", "model": str(photos)})


@pytest.mark.usefixtures("ray_session")
def test_actor_pools_that_leave_no_cpu_for_the_tasks_are_refused(photos, tmp_path):
    job = annotate_job(photos, tmp_path / "set", resources={"num_cpus_per_detector": 2})
    with pytest.raises(ConfigError, match=r"hold 2 of the cluster's 2 CPUs, leaving under 0\.5"):
        run_annotation(job)
    assert not (tmp_path / "set" / "metadata.jsonl").exists()
    assert json.loads((tmp_path / "set" / "annotate.json").read_text())["resolution"] == 48
