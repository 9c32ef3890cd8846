"""ControlNet 1.1's annotators (controlnet_aux): each map equals controlnet_aux's own call with
the same weights and settings, in the detector and in an annotate job whose set training reads;
weights missing or of the wrong layout are refused naming what is wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pixfleet.config import ControlPreprocessConfig
from pixfleet.engine import lockstep
from pixfleet.engine.detectors import AnnotatorDetector, load_detector
from pixfleet.engine.preprocess import detect
from pixfleet.models.annotators import ANNOTATORS, make_random_annotator
from tests.helpers import random_image

pytestmark = pytest.mark.timeout(240)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """One folder with every annotator's checkpoints (random weights), as lllyasviel/Annotators
    lays them out."""
    folder = tmp_path_factory.mktemp("Annotators")
    for detector in ANNOTATORS:
        make_random_annotator(detector, folder)
    return folder


def controlnet_aux_call(detector: str, folder, image: np.ndarray, **settings) -> np.ndarray:
    """The annotator as controlnet_aux's README calls it."""
    import controlnet_aux

    classes = {
        "lineart": controlnet_aux.LineartDetector,
        "lineart_anime": controlnet_aux.LineartAnimeDetector,
        "softedge_hed": controlnet_aux.HEDdetector,
        "scribble_hed": controlnet_aux.HEDdetector,
        "softedge_pidinet": controlnet_aux.PidiNetDetector,
        "mlsd": controlnet_aux.MLSDdetector,
        "openpose": controlnet_aux.OpenposeDetector,
        "normal_bae": controlnet_aux.NormalBaeDetector,
    }
    annotator = classes[detector].from_pretrained(str(folder))
    found = annotator(Image.fromarray(image), image_resolution=min(image.shape[:2]), **settings)
    return np.asarray(found)


# (pixfleet's settings, controlnet_aux's arguments for the same map)
CASES = {
    "lineart": ({"coarse": True}, {"coarse": True}),
    "lineart_anime": ({}, {}),
    "softedge_hed": ({"safe": True}, {"safe": True}),
    "scribble_hed": ({}, {"scribble": True}),
    "softedge_pidinet": ({}, {"safe": False}),
    "mlsd": (
        {"mlsd_value_threshold": 0.05, "mlsd_distance_threshold": 2.0},
        {"thr_v": 0.05, "thr_d": 2.0},
    ),
    "openpose": ({"include_hand": True, "include_face": True}, {"include_hand": True, "include_face": True}),
    "normal_bae": ({}, {}),
}


@pytest.mark.parametrize("detector", list(CASES))
def test_each_annotator_map_equals_controlnet_aux_own_call_and_batched_as_on_a_gpu_too(
    annotators, detector, monkeypatch
):
    """One by one (pixfleet on a CPU) each map is controlnet_aux's own; with the batch's calls
    side by side and their forwards batched (pixfleet on a GPU) the maps stay the same but for
    float rounding."""
    settings, arguments = CASES[detector]
    control = ControlPreprocessConfig(detector=detector, model=str(annotators), detect_resolution=128, **settings)
    run = load_detector(control, CPU)
    assert isinstance(run, AnnotatorDetector) and run.lockstep is None
    images = [np.asarray(random_image(seed, size)) for seed, size in ((1, (128, 64)), (3, (128, 64)), (2, (80, 48)))]
    maps = run(images)
    for image, found in zip(images, maps, strict=True):
        assert found.shape == image.shape and found.dtype == np.uint8
    expected = controlnet_aux_call(detector, annotators, images[0], detect_resolution=128, **arguments)
    np.testing.assert_array_equal(maps[0], expected)  # sides of 64: the annotator's map needs no resize
    if detector not in ("openpose", "mlsd", "scribble_hed"):  # random weights find no pose, line or stroke
        assert maps[0].std() > 0

    batches = []
    run_together = lockstep._run_together
    monkeypatch.setattr(lockstep, "_run_together", lambda group: (batches.append(len(group)), run_together(group)))
    for alone, together in zip(maps, AnnotatorDetector(control, CPU, batch_forwards=True)(images), strict=True):
        assert together.shape == alone.shape and together.dtype == np.uint8
        apart = np.abs(together.astype(int) - alone.astype(int))
        assert apart.max() <= 1 and (apart > 0).mean() < 1e-3  # a batch moves float rounding at most
    assert max(batches) >= 2  # the two 128x64 images went through the network together


def test_shuffle_is_controlnet_aux_content_shuffle_seeded_by_the_image_and_tile_downsamples():
    image = np.asarray(random_image(5, (128, 64)))
    shuffle = ControlPreprocessConfig(detector="shuffle", detect_resolution=128)
    first, again = detect(image, shuffle), detect(image.copy(), shuffle)
    np.testing.assert_array_equal(first, again)  # a rerun makes the same map
    assert first.shape == image.shape and not np.array_equal(first, image)
    assert not np.array_equal(first, detect(np.asarray(random_image(6, (128, 64))), shuffle))

    from controlnet_aux import ContentShuffleDetector

    np.random.seed(0)
    direct = ContentShuffleDetector()(image, detect_resolution=128, image_resolution=64, output_type="np")
    assert direct.shape == first.shape  # the same operation, another draw

    tile = detect(image, ControlPreprocessConfig(detector="tile", tile_downsample=4))
    assert tile.shape == image.shape
    smooth = np.abs(np.diff(tile.astype(int), axis=1)).mean()
    assert smooth < np.abs(np.diff(image.astype(int), axis=1)).mean() / 2  # detail removed
    np.testing.assert_array_equal(detect(image, ControlPreprocessConfig(detector="tile")), image)


def test_the_module_and_settings_are_recorded_as_sd_webui_controlnet_names_them(annotators):
    def provenance(**control):
        return ControlPreprocessConfig(**control).provenance()

    model = {"model": str(annotators)}
    assert provenance(detector="lineart", **model) == {"Module": "lineart_realistic", "Processor Res": 512}
    assert provenance(detector="lineart", coarse=True, **model)["Module"] == "lineart_coarse"
    assert provenance(detector="softedge_hed", safe=True, **model)["Module"] == "softedge_hedsafe"
    assert provenance(detector="openpose", include_hand=True, include_face=True, **model)["Module"] == "openpose_full"
    assert provenance(detector="mlsd", detect_resolution=256, mlsd_value_threshold=0.2, **model) == {
        "Module": "mlsd",
        "Processor Res": 256,
        "Threshold A": 0.2,
        "Threshold B": 0.1,
    }
    assert provenance(detector="tile", tile_downsample=2) == {"Module": "tile_resample", "Threshold A": 2.0}
    assert provenance(detector="canny") == {"Module": "canny", "Threshold A": 100, "Threshold B": 200}


def test_soft_edges_are_scored_by_ms_ssim_of_the_detector_run_again(annotators):
    from pixfleet.evaluation.controllability import ControllabilityScorer

    control = ControlPreprocessConfig(detector="softedge_hed", model=str(annotators), detect_resolution=192)
    scorer = ControllabilityScorer(control, CPU)
    images = [np.asarray(random_image(seed, (192, 192))) for seed in (1, 2)]
    maps = scorer.detect(images)
    assert scorer.metric == "ms_ssim"
    same, other = scorer(images, [maps[0], maps[0]])
    assert same == pytest.approx(1.0, abs=1e-5) and other < same


def test_missing_weights_are_refused_naming_the_detector_folder_and_files(annotators, tmp_path):
    with pytest.raises(ValidationError) as refused:
        ControlPreprocessConfig(detector="openpose", model=str(tmp_path))
    assert (
        f"detector 'openpose': {tmp_path} lacks body_pose_model.pth, hand_pose_model.pth, facenet.pth "
        "(it reads body_pose_model.pth, hand_pose_model.pth, facenet.pth, laid out as the lllyasviel/Annotators "
        "repository)"
    ) in str(refused.value)
    with pytest.raises(ValidationError, match=r"detector 'lineart' needs 'model' \(a hub id or lllyasviel/Annotators"):
        ControlPreprocessConfig(detector="lineart")


def test_a_checkpoint_of_another_layout_is_refused_naming_the_file_and_its_missing_keys(annotators, tmp_path):
    folder = tmp_path / "Annotators"
    folder.mkdir()
    shutil.copy(annotators / "sk_model.pth", folder)
    shutil.copy(annotators / "ControlNetHED.pth", folder / "sk_model2.pth")  # the wrong model under the name
    with pytest.raises(ValidationError) as refused:  # by the config check, before any work
        ControlPreprocessConfig(detector="lineart", model=str(folder))
    message = refused.value.errors()[0]["msg"]
    assert f"detector 'lineart': {folder / 'sk_model2.pth'}: not the checkpoint" in message
    assert "missing keys model0.1.weight, " in message and "sk_model.pth" not in message.replace("sk_model2", "")

    # An actor whose node holds another copy of the folder than the one checked: the load says the same.
    checked = ControlPreprocessConfig(detector="lineart", model=str(annotators))
    with pytest.raises(ValueError, match=r"sk_model2\.pth: not the checkpoint") as at_load:
        load_detector(checked.model_copy(update={"model": str(folder)}), CPU)
    assert str(at_load.value) in message


@pytest.mark.usefixtures("ray_session")
def test_annotate_with_an_annotator_writes_its_maps_into_a_set_training_reads(annotators, tmp_path):
    from pixfleet.annotation.job import run_annotation
    from pixfleet.config.annotation import AnnotateJobConfig
    from pixfleet.config.training import ControlNetTrainingArgs
    from pixfleet.data.fill50k import fill50k_row
    from pixfleet.training.data import training_table

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        fill50k_row(rng, 64)[0].save(photos / f"{i}.png")
    job = AnnotateJobConfig.model_validate(
        {
            "source": {"path": str(photos)},
            "detector": {"detector": "softedge_hed", "model": str(annotators), "detect_resolution": 64},
            "resolution": 64,
            "caption": {"template": "circles {stem}"},
            "output_dir": str(tmp_path / "set"),
            "tracking": {"enabled": False},
        }
    )
    summary = run_annotation(job)
    assert (summary.rows_ok, summary.rows_failed) == (4, 0)
    lines = [json.loads(line) for line in (tmp_path / "set" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        photo = np.asarray(Image.open(photos / f"{line['text'].split()[-1]}.png").convert("RGB"))
        written = np.asarray(Image.open(tmp_path / "set" / line["conditioning_image_file_name"]))
        expected = controlnet_aux_call("softedge_hed", annotators, photo, detect_resolution=64)
        np.testing.assert_array_equal(written, expected)
    args = ControlNetTrainingArgs(pretrained_model_name_or_path="a/b", train_data_dir=str(tmp_path / "set"))
    assert training_table(args).num_rows == 4
