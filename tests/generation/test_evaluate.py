"""The evaluate section: per-image scores in the manifest, their summary in MLflow, and a
controllability score that moves with the control the ControlNet got."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pixfleet.config import ConfigError, ControlPreprocessConfig
from pixfleet.engine import columns as C
from pixfleet.engine.detectors import DepthDetector, SegmentationDetector
from pixfleet.evaluation.metrics import ClipScorer, depth_rmse, palette_labels, segmentation_miou
from pixfleet.generation.job import run_generation
from pixfleet.generation.stages.evaluate_stage import EvaluateStage
from pixfleet.models.annotators import make_random_annotator
from tests.helpers import random_image, tiny_job

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory) -> str:
    from pixfleet.models.tiny import make_tiny_clip

    return str(make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def test_the_stage_scores_each_control_map_with_its_detector_and_a_failing_row_keeps_its_image(
    tiny_dir, clip_model, tmp_path
):
    from pixfleet.models.tiny import make_tiny_segmenter

    depth, segmenter = str(tiny_dir / "dpt"), str(make_tiny_segmenter(tmp_path / "segformer"))
    controls = {
        C.control_column(0): ControlPreprocessConfig(detector="depth", model=depth),
        C.control_column(1): ControlPreprocessConfig(detector="segmentation", model=segmenter),
    }
    images = [np.asarray(random_image(seed, (48, 48))) for seed in range(3)]
    depth_maps = DepthDetector(depth, torch.device("cpu"))([np.asarray(random_image(9, (48, 48)))] * 3)
    segmentations = SegmentationDetector(segmenter, torch.device("cpu"))([np.asarray(random_image(8, (48, 48)))] * 3)
    batch = pd.DataFrame(
        {
            C.ROW_ID: ["a", "b", "c"],
            C.STATUS: [C.OK, C.OK, C.FAILED],
            C.IMAGE: images,
            C.PROMPT: ["a red circle", "blue", "x"],
            C.control_column(0): depth_maps,
            C.control_column(1): [segmentations[0], np.zeros(5, np.uint8), segmentations[2]],  # b's is broken
        }
    )

    scored = EvaluateStage(controls, clip_model, None)(batch)

    assert C.control_column(0) not in scored  # the maps passed on for the stage go no further
    redone_depth = DepthDetector(depth, torch.device("cpu"))(images[:1])[0]
    redone_labels = palette_labels(SegmentationDetector(segmenter, torch.device("cpu"))(images[:1])[0])
    expected = [
        depth_rmse(redone_depth, depth_maps[0]),
        segmentation_miou(redone_labels, palette_labels(segmentations[0])),
    ]
    np.testing.assert_allclose(scored[C.CONTROL_SCORES][0], expected, atol=1e-9)
    assert list(scored[C.CONTROL_METRICS][0]) == ["depth_rmse", "segmentation_miou"]
    assert scored[C.CLIP_SCORE][0] == pytest.approx(
        ClipScorer(clip_model).clip_scores(images[:1], ["a red circle"])[0]
    )
    # b's map could not be compared: b keeps its image, without scores; the failed row gets none.
    assert scored[C.STATUS].tolist() == [C.OK, C.OK, C.FAILED]
    assert scored[C.CONTROL_SCORES][1] is None and pd.isna(scored[C.CLIP_SCORE][1])
    assert scored[C.CONTROL_SCORES][2] is None


def test_evaluation_settings_that_cannot_work_are_refused(tiny_dir, fill50k_dir, tmp_path):
    with pytest.raises(ValueError, match=r"evaluate.controllability: task 'pix2pix' has no ControlNet"):
        tiny_job(tiny_dir, "pix2pix", fill50k_dir, tmp_path, evaluate={})
    with pytest.raises(ValueError, match=r"evaluate.control: the map of ControlNet 0 is given ready-made"):
        tiny_job(tiny_dir, "controlnet", fill50k_dir, tmp_path, evaluate={})
    with pytest.raises(ValueError, match=r"evaluate: nothing to measure"):
        tiny_job(tiny_dir, "pix2pix", fill50k_dir, tmp_path, evaluate={"controllability": False})
    with pytest.raises(ValueError, match=r"ControlNet 0's detector 'shuffle' has no controllability metric"):
        tiny_job(tiny_dir, "controlnet", fill50k_dir, tmp_path, evaluate={"control": [{"detector": "shuffle"}]})
    pidinet = {"detector": "softedge_pidinet", "model": str(make_random_annotator("softedge_pidinet", tmp_path / "a"))}
    with pytest.raises(ValueError, match=r"softedge_pidinet maps are scored by MS-SSIM, which needs images of"):
        tiny_job(tiny_dir, "controlnet", fill50k_dir, tmp_path, evaluate={"control": [pidinet]})


def _with_blank_maps(fill50k_dir, out):
    """fill50k's rows, then each again with its control map black: no edges to follow."""
    shutil.copytree(fill50k_dir, out)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    blanks = []
    for row in rows:
        control = out / row["conditioning_image_file_name"]
        blank = control.with_name(f"blank-{control.name}")
        Image.new("RGB", Image.open(control).size).save(blank)
        blanks.append(row | {"conditioning_image_file_name": str(blank.relative_to(out))})
    (out / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows + blanks))
    return out


@pytest.mark.usefixtures("ray_session")
def test_a_job_scores_every_image_and_controllability_moves_with_the_control(
    tiny_dir, fill50k_dir, clip_model, tmp_path
):
    evaluate = {"control": [{"detector": "canny"}], "clip_model": clip_model}
    data = _with_blank_maps(fill50k_dir, tmp_path / "data")
    summary = run_generation(tiny_job(tiny_dir, "controlnet", data, tmp_path / "out", evaluate=evaluate))

    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    # Rows alike in prompt and (black) map share their id: the manifest holds each once.
    blank = manifest[C.INPUT_FILES].map(lambda files: any("/blank-" in path for path in files))
    assert blank.sum() == len(set(manifest.loc[blank, C.PROMPT])) and (~blank).sum() == 16
    assert (manifest[C.STATUS] == C.OK).all()
    scores = np.stack(manifest[C.CONTROL_SCORES].to_numpy())
    assert scores.shape == (len(manifest), 1) and ((scores >= 0) & (scores <= 1)).all()
    assert manifest[C.CONTROL_METRICS].map(list).tolist() == [["edge_f1"]] * len(manifest)
    assert manifest[C.CLIP_SCORE].between(0, 100).all() and manifest[C.CLIP_IMAGE_SIMILARITY].isna().all()
    # Against black maps no image's edges score; against the circles some do (a random tiny
    # ControlNet barely follows them: F1 0.005 where it does).
    assert (scores[blank.to_numpy()] == 0).all() and scores[~blank.to_numpy()].max() > 0

    figures = summary.scores["control_0.edge_f1"]
    assert figures["count"] == len(manifest) and figures["mean"] == pytest.approx(scores.mean())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'out'}/mlflow.db")
    run = mlflow.get_run(summary.mlflow_run_id)
    assert run.data.metrics["control_0.edge_f1.mean"] == pytest.approx(figures["mean"])
    assert run.data.metrics["clip_score.count"] == len(manifest)
    assert "control_0.edge_f1: mean" in summary.render()
    assert json.loads(run.data.params["evaluate.control"])[0]["detector"] == "canny"


@pytest.mark.usefixtures("ray_session")
def test_an_edit_job_scores_each_edit_against_its_input_and_its_captions(tiny_dir, fill50k_dir, clip_model, tmp_path):
    records = [json.loads(line) for line in (fill50k_dir / "metadata.jsonl").read_text().splitlines()][:4]
    rows = [
        {
            "image": str(fill50k_dir / record["file_name"]),
            "text": "make it snow",
            "before": record["text"],
            "after": "" if i == 3 else f"{record['text']} in the snow",  # an empty caption: its own embedding
        }
        for i, record in enumerate(records)
    ]
    manifest_path = tmp_path / "edits.jsonl"
    manifest_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    captions = {"input_caption_column": "before", "edited_caption_column": "after"}
    evaluate = {"controllability": False, "clip_model": clip_model, **captions}

    # SDXL's InstructPix2Pix as a job: its A1111 text carries the image guidance too.
    job = tiny_job(tiny_dir, "sdxl_pix2pix", manifest_path, tmp_path / "out", evaluate=evaluate)
    summary = run_generation(job)

    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == 4 and (manifest[C.STATUS] == C.OK).all()
    image = Image.open(manifest[C.OUTPUT_PATH][0])
    assert image.size == (32, 32) and "Image CFG scale: 1.5" in image.info["parameters"]
    for column in (C.CLIP_IMAGE_SIMILARITY, C.CLIP_DIRECTIONAL_SIMILARITY):
        assert manifest[column].between(-1, 1).all() and manifest[column].nunique() == 4
    assert manifest[C.CONTROL_SCORES].isna().all()
    assert summary.scores["clip_directional_similarity"]["count"] == 4

    missing = {"input_caption_column": "before", "edited_caption_column": "after_edit"}
    with pytest.raises(ConfigError, match=r"after_edit"):
        run_generation(tiny_job(tiny_dir, "sdxl_pix2pix", manifest_path, tmp_path / "o2", evaluate=evaluate | missing))
