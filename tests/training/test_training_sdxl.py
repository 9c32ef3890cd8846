"""SDXL ControlNet fine-tuning (train_controlnet_sdxl.py's step): the text side precomputed on Ray
Data, the micro-conditioning of each row, ZeRO-2 with resume, and outputs plain diffusers loads."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pixfleet.config.training import ControlNetTrainingArgs, TrainingJobConfig
from pixfleet.training.data import TrainPreprocess
from pixfleet.training.trainer import run_training
from tests.helpers import tracking_uri
from tests.training.test_training import assert_loss_falls, metric_history

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory) -> Path:
    from pixfleet.data.fill50k import make_fill50k

    return make_fill50k(tmp_path_factory.mktemp("train_sdxl") / "fill50k", n=16, size=64, seed=2)


def sdxl_args(tiny_dir: Path, data: Path, **values) -> ControlNetTrainingArgs:
    return ControlNetTrainingArgs(
        pretrained_model_name_or_path=str(tiny_dir / "sdxl_controlnet"),
        train_data_dir=str(data),
        resolution=64,
        **values,
    )


def preprocess(args: ControlNetTrainingArgs, images: list[Image.Image], captions: list[str], tmp_path: Path):
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    batch = pd.DataFrame(
        {"image": paths, "conditioning_image": paths, "text": captions, "source_ref": [f"row{i}" for i in range(4)]}
    )
    return TrainPreprocess(args)(batch)


def test_sdxl_rows_carry_the_pipelines_prompt_embeddings_and_their_own_size_and_crop(tiny_dir, sdxl_data, tmp_path):
    from diffusers import StableDiffusionXLControlNetPipeline

    rng = np.random.default_rng(0)
    sizes = [(64, 64), (96, 64), (64, 128), (80, 72)]  # (width, height)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    captions = ["red circle", "a much longer caption about a blue circle on grey", "", "green"]
    out = preprocess(sdxl_args(tiny_dir, sdxl_data), images, captions, tmp_path)

    # The text side is what the SDXL pipeline itself encodes for these prompts (no guidance).
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(str(tiny_dir / "sdxl_controlnet"))
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(torch.as_tensor(np.stack(out["prompt_embeds"])), prompt_embeds)
    torch.testing.assert_close(torch.as_tensor(np.stack(out["text_embeds"])), pooled)
    assert "input_ids" not in out

    # Micro-conditioning: each row's real (h, w), the center crop's (top, left) after the
    # shorter side is scaled to 64, and the target size.
    time_ids = np.stack(out["time_ids"]).tolist()
    assert time_ids == [
        [64, 64, 0, 0, 64, 64],
        [64, 96, 0, 16, 64, 64],
        [128, 64, 32, 0, 64, 64],
        [72, 80, 0, 3, 64, 64],
    ]
    assert np.stack(out["pixel_values"]).shape == (4, 3, 64, 64)

    # Given crop coordinates apply to every row, as the script's constants.
    fixed = sdxl_args(tiny_dir, sdxl_data, crops_coords_top_left_h=5, crops_coords_top_left_w=7)
    assert {tuple(t[2:4]) for t in preprocess(fixed, images, captions, tmp_path)["time_ids"]} == {(5.0, 7.0)}


def test_crop_coordinates_come_in_pairs_and_npu_attention_is_refused(tiny_dir, sdxl_data):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set both crops_coords_top_left_h and crops_coords_top_left_w"):
        sdxl_args(tiny_dir, sdxl_data, crops_coords_top_left_h=5)
    with pytest.raises(ValidationError, match="enable_npu_flash_attention: needs torch_npu"):
        sdxl_args(tiny_dir, sdxl_data, enable_npu_flash_attention=True)


@pytest.mark.usefixtures("ray_session")
def test_sdxl_zero3_offload_loss_falls_resumes_both_ranks_and_saves_whole_weights(tiny_dir, sdxl_data, tmp_path):
    # The multi-worker DeepSpeed run of the suite: ZeRO-3 partitions parameters and optimizer
    # states across the two ranks (both offloaded to CPU), each rank resumes its own shards, and
    # the saved ControlNet is whole. ZeRO-2 with optimizer offload trains in the annotate loop test.
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel

    image = str(sdxl_data / "conditioning_images" / "000000.png")
    job = TrainingJobConfig.model_validate(
        {
            "name": "sdxl",
            "train": {
                **sdxl_args(tiny_dir, sdxl_data).model_dump(exclude_defaults=True),
                "output_dir": str(tmp_path / "controlnet"),
                "train_batch_size": 4,
                "learning_rate": 1e-3,
                "lr_warmup_steps": 0,
                "seed": 0,
                "max_train_steps": 8,
                "checkpointing_steps": 8,
            },
            "distributed": {
                "strategy": "deepspeed",
                "num_workers": 2,
                "zero_stage": 3,
                "offload_optimizer": True,
                "offload_param": True,
                "storage_path": str(tmp_path / "ray_train"),
            },
            "tracking": {"tracking_uri": tracking_uri(tmp_path), "experiment": "tests"},
            "registry": {"model_name": "tiny-sdxl-controlnet", "alias": "champion"},
        }
    )
    first = run_training(job)
    files = {p.name for p in Path(first.checkpoint_path).rglob("*") if p.is_file()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files

    # Resumed to 16 steps, with a validation grid through the SDXL ControlNet pipeline at the end.
    train = job.train.model_copy(
        update={
            "max_train_steps": 16,
            "resume_from_checkpoint": "latest",
            "validation_prompt": ["red circle with blue background"],
            "validation_image": [image],
            "num_validation_images": 1,
            "validation_steps": 100,
        }
    )
    second = run_training(job.model_copy(update={"train": train}))
    assert [step for step, _ in metric_history(tmp_path, second.mlflow_run_id)] == list(range(9, 17))
    losses = [
        v for _, v in metric_history(tmp_path, first.mlflow_run_id) + metric_history(tmp_path, second.mlflow_run_id)
    ]
    assert_loss_falls(losses, window=4)
    assert Image.open(Path(second.output_dir) / "validation" / "step_000016.png").size == (64 * 2, 64)

    # The result loads into a plain SDXL ControlNet pipeline and generates; the registry has it.
    controlnet = ControlNetModel.from_pretrained(second.output_dir)
    assert controlnet.config.addition_embed_type == "text_time"
    initial = ControlNetModel.from_unet(
        UNet2DConditionModel.from_pretrained(str(tiny_dir / "sdxl_controlnet" / "unet")),
        conditioning_embedding_out_channels=(16, 32),
    ).state_dict()
    trained = controlnet.state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in initial.items()}
    assert not torch.equal(trained["controlnet_mid_block.weight"], initial["controlnet_mid_block.weight"])
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        str(tiny_dir / "sdxl_controlnet"), controlnet=controlnet
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe("red circle", image=torch.rand(1, 3, 64, 64), num_inference_steps=2, height=64, width=64)
    assert np.asarray(out.images[0]).shape == (64, 64, 3)
    assert second.model_version == "models:/tiny-sdxl-controlnet/2"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    registered = mlflow.artifacts.download_artifacts(
        "models:/tiny-sdxl-controlnet@champion", dst_path=str(tmp_path / "dl")
    )
    assert (Path(registered) / "diffusion_pytorch_model.safetensors").read_bytes() == (
        Path(second.output_dir) / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
