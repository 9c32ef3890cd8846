"""Image captioning with a transformers model (BLIP, GIT, ...), loaded once, run on batches."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class Captioner:
    """`AutoModelForImageTextToText` and its processor: greedy captions of RGB images (HWC uint8),
    as `model.generate` writes them for each image alone."""

    def __init__(self, model: str, device: torch.device, max_new_tokens: int = 30, prompt: str | None = None):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[str]:
        pils = [Image.fromarray(image) for image in images]
        text = [self.prompt] * len(pils) if self.prompt else None
        inputs = self.processor(images=pils, text=text, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [caption.strip() for caption in self.processor.batch_decode(tokens, skip_special_tokens=True)]
