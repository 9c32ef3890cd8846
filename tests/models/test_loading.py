"""Every task loads through from_pretrained and generates; schedulers and switches apply."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pixfleet.config import FreeUConfig, OptimizationConfig
from pixfleet.models.folders import ModelLoadError, check_model_folders
from pixfleet.models.loading import load_pipeline
from pixfleet.models.schedulers import SCHEDULERS
from pixfleet.models.tasks import TASKS
from tests.helpers import call_tiny, tiny_spec

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_reloads_and_generates_requested_size(tiny_dir, task):
    pipe = load_pipeline(tiny_spec(tiny_dir, task))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == TASKS[task].pipeline_class_name

    images = call_tiny(pipe, task, ["a red circle", "a blue square"], seeds=[1, 2], size=(48, 64))

    assert images.shape == (2, 64, 48, 3)
    assert images.std() > 0
    assert not np.array_equal(images[0], images[1])


def test_multi_controlnet_applies_each_scale(tiny_dir):
    pipe = load_pipeline(tiny_spec(tiny_dir, "sdxl_controlnet"))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.controlnet).__name__ == "MultiControlNetModel"
    assert len(pipe.controlnet.nets) == 2

    def run(scales):
        return call_tiny(pipe, "sdxl_controlnet", ["x"], [3], controlnet_conditioning_scale=scales)

    both, first_only = run([1.0, 0.8]), run([1.0, 0.0])
    assert both.shape == (1, 64, 64, 3)
    assert np.abs(both.astype(int) - first_only).mean() > 0.5


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_swaps_by_name_and_keeps_noise_schedule(tiny_dir, name):
    pipe = load_pipeline(tiny_spec(tiny_dir, "controlnet", scheduler=name))
    pipe.set_progress_bar_config(disable=True)

    assert type(pipe.scheduler) is SCHEDULERS[name][0]
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    images = call_tiny(pipe, "controlnet", ["x"], [0])
    assert images.shape == (1, 64, 64, 3)


def _generate(tiny_dir, **optimizations):
    spec = tiny_spec(tiny_dir, "controlnet", optimizations=OptimizationConfig(**optimizations))
    pipe = load_pipeline(spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call_tiny(pipe, "controlnet", ["a", "b"], [5, 6]).astype(int)


def test_slicing_switches_keep_the_output(tiny_dir):
    _, reference = _generate(tiny_dir)
    for switch in ("attention_slicing", "vae_slicing"):
        _, images = _generate(tiny_dir, **{switch: True})
        assert np.abs(images - reference).max() <= 1, switch


def test_vae_tiling_decodes_in_tiles(tiny_dir):
    # The tiny VAE's tiles are 32 px, so a 64 px image is decoded as blended tiles.
    _, reference = _generate(tiny_dir)
    pipe, images = _generate(tiny_dir, vae_tiling=True)
    assert pipe.vae.use_tiling
    assert 0 < np.abs(images - reference).mean() < 20


def test_freeu_changes_the_output(tiny_dir):
    _, reference = _generate(tiny_dir)
    _, images = _generate(tiny_dir, freeu=FreeUConfig())
    assert np.abs(images - reference).mean() > 1


@pytest.mark.parametrize(
    "switches",
    [{"channels_last": True}, {"fuse_qkv_projections": True}, {"channels_last": True, "fuse_qkv_projections": True}],
)
def test_fast_path_switches_keep_the_output(tiny_dir, switches):
    _, reference = _generate(tiny_dir)
    pipe, images = _generate(tiny_dir, **switches)
    if switches.get("channels_last"):
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert pipe.controlnet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if switches.get("fuse_qkv_projections"):
        assert (
            type(pipe.unet.attn_processors["down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor"]).__name__
            == "FusedAttnProcessor2_0"
        )
    assert np.abs(images - reference).max() <= 1


def test_fast_path_is_off_on_cpu_unless_asked(tiny_dir):
    pipe, _ = _generate(tiny_dir)
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert "Fused" not in type(next(iter(pipe.unet.attn_processors.values()))).__name__


@pytest.mark.timeout(600)
def test_torch_compile_compiles_unet_and_controlnet_and_keeps_the_output(tiny_dir):
    # aot_eager traces and partitions as inductor does, without generating kernels: inductor's
    # C++ code generation costs a minute on a cold 2-core CPU (the GPU suite compiles with it).
    pipe, reference = _generate(tiny_dir)
    assert not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    compiled, images = _generate(tiny_dir, torch_compile=True, compile_backend="aot_eager")
    assert isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compiled.controlnet, torch._dynamo.eval_frame.OptimizedModule)
    assert np.abs(images - reference).max() <= 1


def test_fused_projections_are_refused_with_loras_or_sliced_attention(tiny_dir):
    from pixfleet.config import LoraConfig

    with pytest.raises(ValueError, match="fuse_qkv_projections replaces sliced attention"):
        OptimizationConfig(fuse_qkv_projections=True, attention_slicing=True)

    with pytest.raises(ValueError, match="fuse_qkv_projections would bypass the LoRA"):
        tiny_spec(
            tiny_dir,
            "controlnet",
            loras=[LoraConfig(path="x")],
            optimizations=OptimizationConfig(fuse_qkv_projections=True),
        )


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        ({"model_cpu_offload": True}, "model_cpu_offload needs an accelerator"),
        ({"attention_backend": "xformers"}, "'xformers' needs xformers and CUDA"),
    ],
)
def test_accelerator_only_switches_fail_clearly_on_cpu(tiny_dir, switches, message):
    spec = tiny_spec(tiny_dir, "controlnet", optimizations=OptimizationConfig(**switches))
    with pytest.raises(ValueError, match=message):
        load_pipeline(spec)


def test_lora_weights_load_and_change_the_output(tiny_dir, tmp_path):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    from pixfleet.config import LoraConfig

    pipe, reference = _generate(tiny_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(PeftLoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionControlNetPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)

    spec = tiny_spec(tiny_dir, "controlnet", loras=[LoraConfig(path=str(tmp_path), scale=1.0)])
    with_lora = load_pipeline(spec)
    with_lora.set_progress_bar_config(disable=True)
    assert with_lora.get_active_adapters() == ["lora_0"]
    images = call_tiny(with_lora, "controlnet", ["a", "b"], [5, 6]).astype(int)
    assert np.abs(images - reference).mean() > 1


def test_textual_inversion_adds_a_token(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    from pixfleet.config import TextualInversionConfig

    torch.manual_seed(0)
    vector = torch.randn(1, 32)
    save_file({"emb_params": vector}, tmp_path / "learned_embeds.safetensors")
    inversion = TextualInversionConfig(path=str(tmp_path / "learned_embeds.safetensors"), token="<circle-style>")
    pipe = load_pipeline(tiny_spec(tiny_dir, "controlnet", textual_inversions=[inversion]))

    token_id = pipe.tokenizer.convert_tokens_to_ids("<circle-style>")
    assert token_id >= 514
    embedding = pipe.text_encoder.get_input_embeddings().weight[token_id].detach()
    torch.testing.assert_close(embedding, vector[0])


def test_folder_missing_a_component_fails_before_loading(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "controlnet", broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    spec = tiny_spec(tiny_dir, "controlnet").model_copy(update={"base_model": str(broken)})

    with pytest.raises(ModelLoadError, match=r"broken: task 'controlnet' needs component\(s\) text_encoder"):
        check_model_folders(spec)


def test_pix2pix_task_refuses_a_four_channel_unet(tiny_dir):
    spec = tiny_spec(tiny_dir, "pix2pix").model_copy(update={"base_model": str(tiny_dir / "controlnet")})
    with pytest.raises(ModelLoadError, match="needs an 8-channel UNet"):
        check_model_folders(spec)


def test_a_weight_file_cut_short_or_not_safetensors_fails_before_loading(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "controlnet", broken)
    spec = tiny_spec(tiny_dir, "controlnet").model_copy(update={"base_model": str(broken)})
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    whole = weights.read_bytes()

    weights.write_bytes(whole[: len(whole) * 9 // 10])  # a copy that stopped
    cut = rf"vae/diffusion_pytorch_model\.safetensors: cut short: {len(whole) * 9 // 10} bytes"
    with pytest.raises(ModelLoadError, match=rf"{cut}, its header describes {len(whole)}"):
        check_model_folders(spec)
    weights.write_bytes(whole[:100])  # stopped inside the header
    with pytest.raises(ModelLoadError, match="cut short: 100 bytes, its header alone takes"):
        check_model_folders(spec)
    weights.write_bytes(b"<html>404</html>")  # a page saved under the name
    with pytest.raises(ModelLoadError, match=r"vae/diffusion_pytorch_model\.safetensors: not a safetensors file"):
        check_model_folders(spec)
    controlnet = tmp_path / "controlnet"
    shutil.copytree(tiny_dir / "controlnet" / "controlnet", controlnet)
    (controlnet / "diffusion_pytorch_model.safetensors").write_bytes(whole[:8])
    with pytest.raises(ModelLoadError, match=r"controlnet/diffusion_pytorch_model\.safetensors: cut short"):
        check_model_folders(tiny_spec(tiny_dir, "controlnet").model_copy(update={"controlnets": [str(controlnet)]}))


def test_weights_that_do_not_fit_their_config_fail_as_one_line_naming_the_folder(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir / "controlnet", broken)
    config = json.loads((broken / "unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * width for width in config["block_out_channels"]]
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    spec = tiny_spec(tiny_dir, "controlnet").model_copy(update={"base_model": str(broken)})
    check_model_folders(spec)  # the files are whole: only loading finds the mismatch

    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(spec)
    assert str(refused.value) == (
        f"{broken}: cannot be loaded as the base model of task 'controlnet': weights that do not fit their "
        "config.json: conv_in.bias is [32] in the weights, [64] by config"
    )
