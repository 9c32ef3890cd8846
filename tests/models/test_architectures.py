"""The published architectures that make-random rebuilds, counted without allocating weights."""

import pytest
import torch

from pixfleet.models.architectures import ARCHITECTURES, PUBLISHED_PARAMETERS_M
from pixfleet.models.random_weights import build_models
from pixfleet.models.tokenizer import CLIP_VOCAB_SIZE, write_byte_level_tokenizer

pytestmark = pytest.mark.timeout(120)


def millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_has_the_published_parameter_counts(arch):
    spec = ARCHITECTURES[arch]
    models = build_models(arch, device="meta")
    assert all(p.device.type == "meta" for m in models.values() for p in m.parameters())
    checked = 0
    for (family, part), published in PUBLISHED_PARAMETERS_M.items():
        if family == spec.family and part in models:
            assert millions(models[part]) == pytest.approx(published, rel=0.005), part
            checked += 1
    assert checked >= 3
    unet = models["unet"]
    assert unet.config.in_channels == spec.unet_in_channels
    text_dims = sum(models[name].config.hidden_size for name in ("text_encoder", "text_encoder_2") if name in models)
    assert unet.config.cross_attention_dim == text_dims
    if "controlnet" in models:
        # A ControlNet copies its UNet's encoder: its count tracks the UNet's family.
        assert millions(models["controlnet"]) == pytest.approx({"sd15": 361.3, "sdxl": 1251.0}[spec.family], rel=0.005)


def test_the_random_models_tokenizer_has_clips_vocabulary_size_and_ids(tmp_path):
    tokenizer = write_byte_level_tokenizer(tmp_path, vocab_size=CLIP_VOCAB_SIZE)
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)  # as in CLIP's own vocabulary
    ids = tokenizer("a photo of a cat, ünïcödé", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and max(ids) == 49407
    assert all(i < 512 or i >= 49406 for i in ids)  # the reserved ids are never produced
