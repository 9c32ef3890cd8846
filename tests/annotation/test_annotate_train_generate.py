"""The platform's loop on one machine: raw photos -> annotate (depth maps, captions) -> fine-tune
the registry's champion ControlNet on that set -> register the challenger -> generate with it
and the same detector."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixfleet.annotation.job import run_annotation
from pixfleet.config import GenerationJobConfig
from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.config.training import TrainingJobConfig
from pixfleet.data.fill50k import fill50k_row
from pixfleet.engine import columns as C
from pixfleet.generation.job import run_generation
from pixfleet.models.tiny import make_tiny_captioner, make_tiny_depth_estimator
from pixfleet.training.trainer import run_training
from tests.helpers import register_controlnet, tiny_spec, tracking_uri

pytestmark = [pytest.mark.timeout(420), pytest.mark.usefixtures("ray_session")]


def test_photos_to_training_set_to_controlnet_to_images(tiny_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(11)
    for i in range(8):
        fill50k_row(rng, 48)[0].save(photos / f"{i}.jpg", quality=95)
    depth = str(make_tiny_depth_estimator(tmp_path / "tiny-dpt"))
    tracking = {"tracking_uri": tracking_uri(tmp_path), "experiment": "loop"}

    annotated = run_annotation(
        AnnotateJobConfig.model_validate(
            {
                "source": {"path": str(photos)},
                "detector": {"detector": "depth", "model": depth},
                "resolution": 32,
                "caption": {"model": str(make_tiny_captioner(tmp_path / "tiny-blip")), "max_new_tokens": 5},
                "output_dir": str(tmp_path / "training_set"),
                "tracking": tracking,
            }
        )
    )
    assert (annotated.rows_ok, annotated.rows_failed) == (8, 0)
    metadata = (tmp_path / "training_set" / "metadata.jsonl").read_text().splitlines()
    captions = [json.loads(line)["text"] for line in metadata]
    assert len(captions) == 8 and all(len(caption.split()) == 5 for caption in captions)

    # The champion to start from: a ControlNet registered earlier.
    seed = tiny_dir / "controlnet" / "controlnet"
    register_controlnet(seed, "depth-controlnet", tracking["tracking_uri"], tmp_path / "artifacts")

    trained = run_training(
        TrainingJobConfig.model_validate(
            {
                "name": "depth-challenger",
                "train": {
                    "pretrained_model_name_or_path": str(tiny_dir / "controlnet"),
                    "controlnet_model_name_or_path": "models:/depth-controlnet@champion",
                    "dataset_name": str(tmp_path / "training_set"),  # through datasets.load_dataset
                    "mixed_precision": None,
                    "output_dir": str(tmp_path / "controlnet"),
                    "resolution": 32,
                    "train_batch_size": 4,
                    "max_train_steps": 4,
                    "learning_rate": 1e-3,
                    "lr_warmup_steps": 0,
                    "seed": 0,
                },
                "distributed": {  # the 8 GB recipe: ZeRO-2, optimizer states on the CPU
                    "strategy": "deepspeed",
                    "zero_stage": 2,
                    "offload_optimizer": True,
                    "num_workers": 1,
                    "storage_path": str(tmp_path / "ray_train"),
                },
                "tracking": tracking,
                "registry": {"model_name": "depth-controlnet", "alias": "challenger"},
            }
        )
    )
    assert trained.model_version == "models:/depth-controlnet/2"
    params = mlflow.get_run(trained.mlflow_run_id).data.params
    assert params["train.controlnet_model_name_or_path"] == "models:/depth-controlnet@champion"  # as written
    assert params["train.controlnet_model_name_or_path.version"] == "models:/depth-controlnet/1"  # as loaded

    challenger = ["models:/depth-controlnet@challenger"]
    spec = tiny_spec(tiny_dir, "controlnet").model_copy(update={"controlnets": challenger})
    generated = run_generation(
        GenerationJobConfig.model_validate(
            {
                "model": spec.model_dump(),
                "source": {"path": str(photos)},
                "preprocess": {"width": 32, "height": 32, "control": [{"detector": "depth", "model": depth}]},
                "params": {"prompt": "a circle", "num_inference_steps": 2},
                "sink": {"output_dir": str(tmp_path / "generated"), "save_control_maps": True},
                "tracking": tracking,
            }
        )
    )
    assert (generated.images_ok, generated.rows_failed) == (8, 0)
    manifest = pd.read_parquet(tmp_path / "generated" / "manifest.parquet")
    assert all("depth-controlnet@challenger" in model for model in manifest["model"])
    for row in manifest.to_dict("records"):
        image = Image.open(row[C.OUTPUT_PATH])
        assert np.asarray(image).shape == (32, 32, 3)
        assert np.asarray(Image.open(row[C.CONTROL_MAPS][0])).shape == (32, 32, 3)
        # The detector's settings, as sd-webui-controlnet records them (the maps themselves equal
        # the depth pipeline's: tests/generation/test_detectors.py).
        text = image.info["parameters"]
        assert '"Module: depth, ' in text and ", Preprocessor model: tiny-dpt, " in text
        assert json.loads(row["control_preprocessing"]) == [{"Module": "depth", "Preprocessor model": depth}]
