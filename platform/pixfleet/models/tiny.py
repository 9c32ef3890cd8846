"""Tiny random pipelines of every task, saved with `save_pretrained`.

Tests and the demo load these through the same `from_pretrained` path as a hub model.
Widths follow diffusers' own fast tests; each component is seeded before it is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    MultiControlNetModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pixfleet.models.tasks import task_info
from pixfleet.models.tokenizer import write_byte_level_tokenizer

TEXT_HIDDEN = 32
TIME_EMBED_DIM = 8


def _text_config(vocab_size: int, bos: int, eos: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _unet(in_channels: int, sdxl: bool) -> UNet2DConditionModel:
    kwargs = {}
    if sdxl:
        kwargs = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": TIME_EMBED_DIM,
            # 6 micro-conditioning ids (sizes, crop, target) + the pooled text embedding.
            "projection_class_embeddings_input_dim": 6 * TIME_EMBED_DIM + TEXT_HIDDEN,
            "use_linear_projection": True,
        }
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN * (2 if sdxl else 1),
        attention_head_dim=(2, 4),
        **kwargs,
    )


def randomize_zero_convs(controlnet: ControlNetModel) -> None:
    """Give the zero-initialised convs random weights, so control maps change images.

    A freshly initialised ControlNet adds exactly nothing to the UNet, and its conditioning
    embedding ends in a zero conv too, so the control image has no effect at all; a tiny test
    model like that would let a dropped, mis-resized or swapped control map pass unseen.
    """
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.1)
        # The embedding's activations are small: a strong last conv makes a black map move
        # the image by about 5 (mean abs, 0-255) at 2 steps, well clear of float noise.
        torch.nn.init.normal_(controlnet.controlnet_cond_embedding.conv_out.weight, std=5.0)


def tiny_components(task: str, num_controlnets: int = 1, seed: int = 0, zero_convs: bool = False) -> dict:
    """The keyword arguments of `TASKS[task].pipeline_class(...)`, all tiny and seeded.

    ControlNets get random weights in their zero convs unless `zero_convs` (see
    `randomize_zero_convs`).
    """
    info = task_info(task)
    tokenizer_dir = Path.home() / ".cache" / "pixfleet" / "byte_level_tokenizer"
    tokenizer = write_byte_level_tokenizer(tokenizer_dir)
    text_config = _text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)

    torch.manual_seed(seed)
    unet = _unet(in_channels=8 if not info.uses_controlnet else 4, sdxl=info.sdxl)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    components = {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
        ),
    }
    if info.sdxl:
        torch.manual_seed(seed)
        components["text_encoder_2"] = CLIPTextModelWithProjection(text_config)
        components["tokenizer_2"] = tokenizer
    if info.uses_controlnet:
        controlnets = []
        for i in range(num_controlnets):
            torch.manual_seed(seed + i)
            # The default embedding downsamples x8; the tiny VAE's scale factor is 2.
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
            if not zero_convs:
                randomize_zero_convs(controlnet)
            controlnets.append(controlnet)
        components["controlnet"] = controlnets[0] if num_controlnets == 1 else MultiControlNetModel(controlnets)
    return components


def make_tiny_pipeline(
    task: str, out_dir: str | Path, num_controlnets: int = 1, seed: int = 0, zero_convs: bool = False
):
    """Build a tiny pipeline of `task`, save it to `out_dir` and return it."""
    info = task_info(task)
    if num_controlnets < 1 or (num_controlnets > 1 and not info.uses_controlnet):
        raise ValueError(f"task {task!r} takes {'1+' if info.uses_controlnet else 'no'} controlnets")
    pipe = info.assemble(tiny_components(task, num_controlnets, seed, zero_convs))
    pipe.save_pretrained(out_dir)
    return pipe


def make_tiny_depth_estimator(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random DPT depth-estimation model and its image processor, saved with
    `save_pretrained`: what `detector: depth` loads in tests in place of Intel/dpt-large."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=64,
        patch_size=8,
        neck_hidden_sizes=[16, 16, 32, 32],
        backbone_out_indices=[0, 1, 2, 3],
        fusion_hidden_size=16,
        head_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    DPTForDepthEstimation(config).save_pretrained(out_dir)
    # dpt-large's processing (a square resize, no aspect kept) at the tiny model's size.
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_segmenter(out_dir: str | Path, seed: int = 0, num_labels: int = 150) -> Path:
    """A tiny random SegFormer with ADE20K's 150 labels and its image processor: what
    `detector: segmentation` loads in tests in place of openmmlab/upernet-convnext-small."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(seed)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=num_labels,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(out_dir)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(out_dir)
    return Path(out_dir)


CAPTION_WORDS = "a photo of the with on in and circle square background red green blue yellow purple orange white"


def make_tiny_captioner(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random BLIP captioner (vision encoder, text decoder, a word-level BERT tokenizer):
    what `caption.model` loads in tests in place of Salesforce/blip-image-captioning-base.
    Its special tokens' logits are pushed down, so a random decoder writes words, not [SEP]."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(special + CAPTION_WORDS.split())}
    torch.manual_seed(seed)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 4, "max_position_embeddings": 64, "encoder_hidden_size": 32}
    text |= {"pad_token_id": 0, "sep_token_id": 3, "eos_token_id": 3, "bos_token_id": vocab["[DEC]"]}
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision |= {"image_size": 64, "patch_size": 16}
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=32))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(special)] = -10.0
    model.save_pretrained(out_dir)
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    BlipProcessor(BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer).save_pretrained(out_dir)
    return Path(out_dir)


def make_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random CLIP (text and vision towers, projections) and its processor, the byte-level
    tokenizer for its text: what the evaluation's CLIP metrics load in tests in place of
    openai/clip-vit-base-patch16."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out_dir)
    tokenizer = write_byte_level_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    text = _text_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id).to_dict()
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision |= {"image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_HIDDEN)).save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


class _TinyInception(torch.nn.Module):
    """clean-fid's Inception file's interface (uint8 NCHW in, `return_features`, the same
    (x - 128) / 128 normalisation) over a random projection of 8 x 8 pooled pixels."""

    def __init__(self, features: int):
        super().__init__()
        self.project = torch.nn.Linear(3 * 8 * 8, features)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (img.to(torch.float32) - 128) * 0.0078125
        return self.project(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))


def make_tiny_inception(path: str | Path, seed: int = 0, features: int = 16) -> Path:
    """A TorchScript file called as inception-2015-12-05.pt is: what FID loads in tests."""
    torch.manual_seed(seed)
    torch.jit.save(torch.jit.script(_TinyInception(features)), str(path))
    return Path(path)
