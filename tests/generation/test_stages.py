"""The stages in-process: faithful to diffusers for every task, independent of batching."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pixfleet.generation import columns as C
from pixfleet.generation.params import derive_seed
from pixfleet.generation.plan import image_columns
from pixfleet.generation.stages.decode_stage import DecodeStage
from pixfleet.generation.stages.generate_stage import GenerateStage
from pixfleet.generation.stages.preprocess_stage import PreprocessStage
from pixfleet.models.tasks import TASKS
from tests.helpers import direct_call, left_half_mask, png_bytes, random_image, tiny_job

pytestmark = pytest.mark.timeout(180)
PROMPTS = ["red circle with blue background", "a green square", "yellow circle"]
SEEDS = [11, 12, 13]


def job_at_64(tiny_dir, task, tmp_path, **sections):
    """A tiny job whose preprocessing keeps the 64 px test images as they are."""
    sections["preprocess"] = {"width": 64, "height": 64, **sections.get("preprocess", {})}
    return tiny_job(tiny_dir, task, tmp_path, tmp_path / "out", **sections)


def stages(job):
    columns = image_columns(job)
    decode = DecodeStage.for_job(job, columns)
    return decode, PreprocessStage(job.preprocess, columns), GenerateStage(job.model, columns)


def canonical_batch(columns: list[str], rows: int, **extra) -> pd.DataFrame:
    """Rows as a source yields them: image bytes, prompt, per-row seed."""
    data = {
        C.ROW_ID: [f"row-{i}" for i in range(rows)],
        C.SOURCE_REF: [f"test:{i}" for i in range(rows)],
        C.PROMPT: PROMPTS[:rows],
        "seed": SEEDS[:rows],
    }
    for column in columns:
        if column == C.MASK_IMAGE:
            data[column] = [png_bytes(left_half_mask())] * rows
        else:
            offset = 1000 if column == C.SOURCE_IMAGE else 0
            data[column] = [png_bytes(random_image(SEEDS[i] + offset)) for i in range(rows)]
    return pd.DataFrame({**data, **extra})


def reference_inputs(task: str, indices: list[int]) -> dict:
    return {
        "prompts": [PROMPTS[i] for i in indices],
        "seeds": [SEEDS[i] for i in indices],
        "controls": [random_image(SEEDS[i]) for i in indices],
        "sources": [random_image(SEEDS[i] + 1000) for i in indices],
        "masks": [left_half_mask()] * len(indices),
    }


@pytest.mark.parametrize("task", list(TASKS))
def test_rows_equal_a_direct_diffusers_call_batched_or_alone(tiny_dir, tmp_path, task):
    job = job_at_64(tiny_dir, task, tmp_path, preprocess={"control": [{"detector": "none"}]})
    decode, preprocess, generate = stages(job)
    out = generate(preprocess(decode(canonical_batch(image_columns(job), 3))))

    assert list(out[C.STATUS]) == [C.OK] * 3
    assert list(out[C.SEED]) == SEEDS
    images = np.stack(out[C.IMAGE])
    assert images.shape == (3, 64, 64, 3)

    # The direct call passes no parameter but the step count: pixfleet's defaults are the pipeline's.
    batched = direct_call(generate.runner.pipe, task, **reference_inputs(task, [0, 1, 2]))
    np.testing.assert_array_equal(images, batched)
    for i in range(3):
        alone = direct_call(generate.runner.pipe, task, **reference_inputs(task, [i]))[0]
        assert np.abs(images[i].astype(float) - alone).mean() < 1.0


def test_seeds_derive_from_job_seed_and_row_id_only():
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert len({derive_seed(0, "a"), derive_seed(0, "b"), derive_seed(1, "a")}) == 3
    assert 0 <= derive_seed(7, "row") < 2**63


def test_row_ids_are_content_hashes_and_recognise_duplicates(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    decode, _, _ = stages(job)
    batch = canonical_batch(image_columns(job), 3, **{C.ROW_ID: ["", "", ""]})
    batch.loc[2, [C.PROMPT, "seed", "control_image_0"]] = batch.loc[0, [C.PROMPT, "seed", "control_image_0"]]
    ids = list(decode(batch)[C.ROW_ID])
    assert ids[0] == ids[2] != ids[1]
    assert all(len(i) == 24 for i in ids)
    other_model = job.model_copy(update={"seed": 5})
    assert stages(other_model)[0](batch)[C.ROW_ID].iloc[0] != ids[0]


def test_num_images_per_prompt_gives_one_row_per_image_with_consecutive_seeds(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path, params={"num_images_per_prompt": 2})
    decode, preprocess, generate = stages(job)
    out = generate(preprocess(decode(canonical_batch(image_columns(job), 2))))
    assert list(out[C.ROW_ID]) == ["row-0", "row-0", "row-1", "row-1"]
    assert list(out[C.IMAGE_INDEX]) == [0, 1, 0, 1]
    assert list(out[C.SEED]) == [11, 12, 12, 13]
    assert not np.array_equal(out[C.IMAGE][0], out[C.IMAGE][1])


def test_rows_of_different_sizes_are_generated_apart_at_their_own_size(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "pix2pix", tmp_path, preprocess={"resize_mode": "none"})
    decode, preprocess, generate = stages(job)
    batch = canonical_batch(image_columns(job), 3)
    batch.loc[1, C.SOURCE_IMAGE] = png_bytes(random_image(5, size=(48, 32)))
    out = generate(preprocess(decode(batch)))
    assert [img.shape for img in out[C.IMAGE]] == [(64, 64, 3), (64, 64, 3), (32, 48, 3)]


def test_bad_rows_fail_alone_with_one_line_reasons(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path, preprocess={"max_image_pixels": 128 * 128})
    decode, preprocess, generate = stages(job)
    good = png_bytes(random_image(1))
    cases = {
        "undecodable": b"this is not an image",
        "truncated": good[: len(good) // 2],
        "zero-size": b"",
        "missing": None,
        "oversized": png_bytes(Image.new("RGB", (256, 256))),
        "good": good,
        "bad-steps": good,
    }
    batch = pd.DataFrame(
        {
            C.ROW_ID: list(cases),
            C.SOURCE_REF: list(cases),
            C.PROMPT: ["x"] * len(cases),
            "control_image_0": list(cases.values()),
            "num_inference_steps": [None] * 6 + [-3],
        }
    )
    out = generate(preprocess(decode(batch))).set_index(C.ROW_ID)
    errors = out[C.ERROR].to_dict()
    assert out.loc["good", C.STATUS] == C.OK and out.loc["good", C.IMAGE].shape == (64, 64, 3)
    assert (out.drop(index="good")[C.STATUS] == C.FAILED).all()
    assert "cannot decode image" in errors["undecodable"]
    assert "cannot decode image" in errors["truncated"]
    assert "empty (zero-size) image" in errors["zero-size"]
    assert "missing or unreadable file" in errors["missing"]
    assert "256x256 exceeds max_image_pixels=16384" in errors["oversized"]
    assert errors["bad-steps"] == "parameter num_inference_steps: Input should be greater than or equal to 1"
    assert all("\n" not in e for e in errors.values())


def test_a_stage_names_the_missing_column(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    _, preprocess, _ = stages(job)
    with pytest.raises(
        C.MissingColumnError, match=r"preprocess stage needs column\(s\) control_image_0; the batch has"
    ):
        preprocess(pd.DataFrame({C.STATUS: [C.OK]}))


def test_png_carries_a1111_parameters(tiny_dir, tmp_path):
    from pixfleet.config import SinkConfig
    from pixfleet.generation.stages.encode_stage import EncodeStage

    job = job_at_64(tiny_dir, "controlnet", tmp_path, params={"negative_prompt": "blurry"})
    decode, preprocess, generate = stages(job)
    generated = generate(preprocess(decode(canonical_batch(image_columns(job), 1))))
    model = {"task": "controlnet", "base_model": "sd15", "controlnets": ["canny"]}
    encoded = EncodeStage(SinkConfig(output_dir=str(tmp_path)), model)(generated)
    import io

    image = Image.open(io.BytesIO(encoded["encoded"][0]))
    np.testing.assert_array_equal(np.asarray(image), generated[C.IMAGE][0])
    prompt, negative, settings = image.info["parameters"].split("\n")
    assert prompt == PROMPTS[0] and negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 11, Size: 64x64, Model: sd15")
    assert 'ControlNet 0: "Model: canny, Weight: 1.0' in settings
    assert json.loads(generated[C.PARAMS][0])["negative_prompt"] == "blurry"
