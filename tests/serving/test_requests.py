"""Request preparation without a server: which images a model's task takes."""

from __future__ import annotations

from pixfleet.config.serving import ServedModelConfig
from pixfleet.serving.requests import check_images, control_fields
from tests.helpers import tiny_spec


def test_one_control_image_feeds_every_controlnet_and_no_other_image(tiny_dir):
    img2img = ServedModelConfig(name="m", model=tiny_spec(tiny_dir, "controlnet_img2img"))
    given = {"image": b"photo", "control_images[0]": b"edges"}
    assert check_images(img2img, given) == given  # one ControlNet: nothing copied for a source image
    assert check_images(img2img, {"control_images[0]": b"edges"}, control_fields(img2img)) == {
        "control_images[0]": b"edges"
    }
    multi = ServedModelConfig(name="m", model=tiny_spec(tiny_dir, "sdxl_controlnet"))
    assert check_images(multi, {"control_images[0]": b"edges"}) == {
        "control_images[0]": b"edges",
        "control_images[1]": b"edges",
    }
