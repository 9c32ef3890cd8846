"""The stages in-process: faithful to diffusers for every task, independent of batching,
sensitive to the control map, and honest about ids, seeds, time and provenance."""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pixfleet.engine import columns as C
from pixfleet.engine.params import derive_seed
from pixfleet.engine.runner import PipelineRunner
from pixfleet.generation.plan import image_columns, job_fingerprint
from pixfleet.generation.sources import ImageRoles
from pixfleet.generation.stages.decode_stage import DecodeStage
from pixfleet.generation.stages.generate_stage import GenerateStage
from pixfleet.generation.stages.preprocess_stage import PreprocessStage
from pixfleet.models.identity import ModelIdentity
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
    roles = ImageRoles.for_task(job.model.task, job.source, job.model.num_controlnets)
    decode = DecodeStage(job, roles.labels(folder=False), job_fingerprint(job, ModelIdentity.of(job.model)))
    columns = image_columns(job)
    return (
        decode,
        PreprocessStage(job.preprocess, columns),
        GenerateStage(job.model, columns, (job.preprocess.width, job.preprocess.height), job.resources.batch_size),
    )


def canonical_batch(columns: list[str], rows: int, images: dict | None = None, **own) -> pd.DataFrame:
    """Rows as a source yields them: image bytes (`images`: column -> PIL images or bytes, else
    seeded noise), and the row's own prompt and seed as JSON."""
    data = {
        C.ROW_ID: [f"row-{i}" for i in range(rows)],
        C.SOURCE_REF: [f"test:{i}" for i in range(rows)],
        C.ROW_PARAMS: [json.dumps({"prompt": PROMPTS[i], "seed": SEEDS[i], **own}) for i in range(rows)],
        C.LOAD_ERRORS: ["{}"] * rows,
        C.INPUT_FILES: [json.dumps([""] * len(columns))] * rows,
    }
    for column in columns:
        if images and column in images:
            data[column] = [image if isinstance(image, bytes) else png_bytes(image) for image in images[column]]
        elif column == C.MASK_IMAGE:
            data[column] = [png_bytes(left_half_mask())] * rows
        else:
            offset = 1000 if column == C.SOURCE_IMAGE else 0
            data[column] = [png_bytes(random_image(SEEDS[i] + offset)) for i in range(rows)]
    return pd.DataFrame(data)


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


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """`upright` stored turned a quarter to the left, with EXIF orientation 6 saying so."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    upright.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def input_image(column: str, size: tuple[int, int]) -> Image.Image:
    if column == C.MASK_IMAGE:
        return left_half_mask(size)
    return random_image(SEEDS[0] + (1000 if column == C.SOURCE_IMAGE else 0), size)


@pytest.mark.parametrize("task", list(TASKS))
def test_odd_sizes_and_exif_rotation_match_a_direct_call_on_load_image(tiny_dir, tmp_path, task):
    """resize_mode 'none' on a 71x49 input (no multiple of 8, nor of the tiny VAE's 2) and on
    an EXIF-rotated JPEG, against a user's direct call on what `diffusers.utils.load_image` reads."""
    from diffusers.utils import load_image

    job = job_at_64(tiny_dir, task, tmp_path, preprocess={"resize_mode": "none", "control": [{"detector": "none"}]})
    columns = image_columns(job)
    files = {
        "odd": {column: png_bytes(input_image(column, (71, 49))) for column in columns},
        "rotated": {column: exif_rotated_jpeg(input_image(column, (49, 71))) for column in columns},
    }
    batch = canonical_batch(columns, 2, images={c: [files["odd"][c], files["rotated"][c]] for c in columns})
    batch[C.ROW_ID] = list(files)
    batch[C.ROW_PARAMS] = [json.dumps({"prompt": PROMPTS[0], "seed": SEEDS[0]})] * 2
    decode, preprocess, generate = stages(job)
    out = generate(preprocess(decode(batch))).set_index(C.ROW_ID)

    # Rounded down to the VAE's multiple (of 8 for inpainting), and upright as the EXIF says.
    shapes = [(48, 64, 3), (64, 48, 3)] if task == "controlnet_inpaint" else [(48, 70, 3), (70, 48, 3)]
    for name, shape in zip(files, shapes, strict=True):
        loaded = {column: load_image(Image.open(io.BytesIO(data))) for column, data in files[name].items()}
        controls = [loaded[c] for c in columns if C.control_index(c) is not None][:1]
        masks = [loaded[C.MASK_IMAGE]] if C.MASK_IMAGE in loaded else []
        reference = direct_call(
            generate.runner.pipe, task, [PROMPTS[0]], [SEEDS[0]], controls, [loaded.get(C.SOURCE_IMAGE)], masks, None
        )[0]
        image = out.loc[name, C.IMAGE]
        assert image.shape == reference.shape == shape
        difference = np.abs(image.astype(float) - reference)
        print(f"{task} {name} {shape[1]}x{shape[0]}: mean |d| {difference.mean():.3f}, max {difference.max():.0f}")
        assert difference.mean() < 1.0


def test_the_control_map_changes_the_image_and_each_controlnet_gets_its_own(tiny_dir, tmp_path):
    """Tiny ControlNets feel their control image: dropping, blanking or swapping maps shows."""
    job = job_at_64(tiny_dir, "controlnet", tmp_path, preprocess={"control": [{"detector": "none"}]})
    decode, preprocess, generate = stages(job)
    columns = image_columns(job)
    real = generate(preprocess(decode(canonical_batch(columns, 1))))[C.IMAGE][0]
    black = generate(
        preprocess(decode(canonical_batch(columns, 1, images={columns[0]: [Image.new("RGB", (64, 64))]})))
    )
    assert np.abs(real.astype(float) - black[C.IMAGE][0]).mean() > 2.0

    multi = job_at_64(
        tiny_dir,
        "sdxl_controlnet",
        tmp_path,
        preprocess={"control": [{"detector": "none"}]},
        source={"control_columns": ["a", "b"]},
    )
    decode, preprocess, generate = stages(multi)
    first, second = random_image(1), random_image(2)
    columns = image_columns(multi)
    ordered = canonical_batch(columns, 1, images={columns[0]: [first], columns[1]: [second]})
    swapped = canonical_batch(columns, 1, images={columns[0]: [second], columns[1]: [first]})
    images = [generate(preprocess(decode(batch)))[C.IMAGE][0] for batch in (ordered, swapped)]
    assert np.abs(images[0].astype(float) - images[1]).mean() > 1.0
    reference = direct_call(
        generate.runner.pipe, "sdxl_controlnet", [PROMPTS[0]], [SEEDS[0]], [first], controls_2=[second]
    )
    assert np.abs(images[0].astype(float) - reference[0]).mean() < 1.0


@pytest.mark.parametrize("size", [(128, 48), (48, 128), (70, 50)])
@pytest.mark.parametrize("mode", ["center_crop", "resize"])
def test_fitting_is_diffusers_image_processor_resize(size, mode):
    """center_crop is VaeImageProcessor's 'crop', resize its 'default', both Lanczos."""
    from diffusers.image_processor import VaeImageProcessor

    from pixfleet.engine.preprocess import fit_image

    image = random_image(3, size)
    fitted = fit_image(np.asarray(image), 64, 64, mode, "lanczos")
    processor = VaeImageProcessor(vae_scale_factor=8)
    expected = processor.resize(image, 64, 64, resize_mode="crop" if mode == "center_crop" else "default")
    np.testing.assert_array_equal(fitted, np.asarray(expected))


def test_seeds_derive_from_the_job_seed_and_the_row_key_only():
    assert derive_seed(0, "a") == derive_seed(0, "a")
    assert len({derive_seed(0, "a"), derive_seed(0, "b"), derive_seed(1, "a")}) == 3
    assert 0 <= derive_seed(7, "row") < 2**63


def test_row_ids_are_content_hashes_and_recognise_duplicates(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    decode, _, _ = stages(job)
    batch = canonical_batch(image_columns(job), 3)
    batch[C.ROW_ID] = ""
    batch.loc[2, [C.ROW_PARAMS, "control_image_0"]] = batch.loc[0, [C.ROW_PARAMS, "control_image_0"]]
    ids = list(decode(batch)[C.ROW_ID])
    assert ids[0] == ids[2] != ids[1]
    assert all(len(i) == 24 for i in ids)
    other_job_seed = job.model_copy(update={"seed": 5})
    assert stages(other_job_seed)[0](batch)[C.ROW_ID].iloc[0] != ids[0]


def test_a_moved_model_keeps_row_ids_seeds_and_images(tiny_dir, tmp_path):
    """A model is identified by its content: a copy elsewhere is the same model."""
    moved = tmp_path / "elsewhere" / "my-controlnet"
    shutil.copytree(tiny_dir / "controlnet", moved)
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    moved_job = job.model_copy(
        update={
            "model": job.model.model_copy(
                update={"base_model": str(moved), "controlnets": [str(moved / "controlnet")]}
            )
        }
    )
    results = []
    for each in (job, moved_job):
        decode, preprocess, generate = stages(each)
        batch = canonical_batch(image_columns(each), 2)
        batch[C.ROW_ID] = ""
        batch[C.ROW_PARAMS] = [json.dumps({"prompt": p}) for p in PROMPTS[:2]]  # seeds derived
        results.append(generate(preprocess(decode(batch))))
    assert list(results[0][C.ROW_ID]) == list(results[1][C.ROW_ID])
    assert list(results[0][C.SEED]) == list(results[1][C.SEED])
    np.testing.assert_array_equal(np.stack(results[0][C.IMAGE]), np.stack(results[1][C.IMAGE]))
    from pixfleet.models.tiny import make_tiny_pipeline

    make_tiny_pipeline("controlnet", tmp_path / "seed-1", seed=1)
    other = job.model.model_copy(update={"controlnets": [str(tmp_path / "seed-1" / "controlnet")]})
    assert ModelIdentity.of(other).fingerprint() != ModelIdentity.of(job.model).fingerprint()


def test_num_images_per_prompt_gives_one_row_per_image_with_consecutive_seeds(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path, params={"num_images_per_prompt": 2})
    decode, preprocess, generate = stages(job)
    out = generate(preprocess(decode(canonical_batch(image_columns(job), 2))))
    assert list(out[C.ROW_ID]) == ["row-0", "row-0", "row-1", "row-1"]
    assert list(out[C.IMAGE_INDEX]) == [0, 1, 0, 1]
    assert list(out[C.SEED]) == [11, 12, 12, 13]
    assert not np.array_equal(out[C.IMAGE][0], out[C.IMAGE][1])


def test_generate_seconds_sum_to_the_stage_time_not_a_multiple_of_it(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path, params={"num_images_per_prompt": 2})
    decode, preprocess, generate = stages(job)
    prepared = preprocess(decode(canonical_batch(image_columns(job), 3)))
    start = time.perf_counter()
    out = generate(prepared)
    elapsed = time.perf_counter() - start
    assert len(out) == 6
    assert 0.5 * elapsed < out[C.GENERATE_SECONDS].sum() <= elapsed


def test_rows_of_different_sizes_are_generated_apart_at_their_own_size(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "pix2pix", tmp_path, preprocess={"resize_mode": "none"})
    decode, preprocess, generate = stages(job)
    batch = canonical_batch(image_columns(job), 3)
    batch.loc[1, C.SOURCE_IMAGE] = png_bytes(random_image(5, size=(48, 32)))
    out = generate(preprocess(decode(batch)))
    assert [img.shape for img in out[C.IMAGE]] == [(64, 64, 3), (64, 64, 3), (32, 48, 3)]


def test_out_of_memory_retries_in_halves_and_fails_only_rows_that_never_fit(tiny_dir, tmp_path, monkeypatch):
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    decode, preprocess, generate = stages(job)
    prepared = preprocess(decode(canonical_batch(image_columns(job), 3)))
    reference = np.stack(generate(prepared)[C.IMAGE])

    real_generate, calls = generate.runner.generate, []

    def generate_within(limit):
        def fake(rows, deadline=None):
            calls.append(len(rows))
            if len(rows) > limit:  # what torch raises when a CUDA allocation fails
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_generate(rows, deadline)

        return fake

    monkeypatch.setattr(generate.runner, "generate", generate_within(1))
    out = generate(prepared)
    assert calls == [3, 1, 2, 1, 1]
    assert list(out[C.STATUS]) == [C.OK] * 3
    # Each row has its own generator: the halves draw what the whole batch drew (float noise aside).
    assert np.abs(np.stack(out[C.IMAGE]).astype(int) - reference).max() <= 1

    monkeypatch.setattr(generate.runner, "generate", generate_within(0))
    out = generate(prepared)
    assert list(out[C.STATUS]) == [C.FAILED] * 3
    assert (
        out[C.ERROR]
        .str.startswith("out of memory even alone (64x64, 1 image(s)): OutOfMemoryError: CUDA out of memory")
        .all()
    )


def test_generators_stay_on_the_cpu_whatever_the_device(tiny_dir, tmp_path):
    """The initial noise comes from CPU generators, so a seed draws the same latents on any
    GPU or on the CPU (diffusers' advice for reproducible results across devices)."""
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    decode, preprocess, generate = stages(job)
    rows = preprocess(decode(canonical_batch(image_columns(job), 2))).to_dict("records")
    on_gpu = PipelineRunner(generate.runner.pipe, "controlnet", 1, torch.device("cuda"))
    generators = on_gpu.call_kwargs(rows, json.loads(rows[0][C.PARAMS]))["generator"]
    assert [g.device.type for g in generators] == ["cpu", "cpu"]
    assert [g.initial_seed() for g in generators] == [row[C.SEED] for row in rows]


def test_bad_rows_fail_alone_with_one_line_reasons_naming_the_users_column(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path, preprocess={"max_image_pixels": 128 * 128})
    decode, preprocess, generate = stages(job)
    good = png_bytes(random_image(1))
    cases = {
        "undecodable": (b"this is not an image", {}),
        "truncated": (good[: len(good) // 2], {}),
        "zero-size": (b"", {}),
        "missing": (None, {}),
        "oversized": (png_bytes(Image.new("RGB", (256, 256))), {}),
        "good": (good, {}),
        "bad-steps": (good, {"num_inference_steps": -3}),
        "huge-seed": (good, {"seed": 2**64}),
        "inf-guidance": (good, {"guidance_scale": float("inf")}),
        "late-start": (good, {"control_guidance_start": 1.0}),
        "strength": (good, {"strength": 0.5}),
    }
    batch = pd.DataFrame(
        {
            C.ROW_ID: list(cases),
            C.SOURCE_REF: list(cases),
            C.ROW_PARAMS: [json.dumps({"prompt": "x", **own}) for _, own in cases.values()],
            C.LOAD_ERRORS: [
                json.dumps({"control_image_0": "x.png: no such file"} if data is None else {})
                for data, _ in cases.values()
            ],
            C.INPUT_FILES: [json.dumps([""])] * len(cases),
            "control_image_0": [data for data, _ in cases.values()],
        }
    )
    out = generate(preprocess(decode(batch))).set_index(C.ROW_ID)
    errors = out[C.ERROR].to_dict()
    assert out.loc["good", C.STATUS] == C.OK and out.loc["good", C.IMAGE].shape == (64, 64, 3)
    assert (out.drop(index="good")[C.STATUS] == C.FAILED).all()
    assert errors["undecodable"] == "conditioning_image: cannot decode image (not a format Pillow reads)"
    assert "conditioning_image: cannot decode image" in errors["truncated"]
    assert errors["zero-size"] == "conditioning_image: empty (zero-size) image"
    assert errors["missing"] == "conditioning_image: x.png: no such file"
    assert errors["oversized"] == "conditioning_image: 256x256 exceeds max_image_pixels=16384"
    assert errors["bad-steps"] == "parameter num_inference_steps: Input should be greater than or equal to 1"
    assert errors["huge-seed"] == "parameter seed: Input should be less than 9223372036854775808"
    assert errors["inf-guidance"] == "parameter guidance_scale: Input should be a finite number"
    assert errors["late-start"] == (
        "parameter control_guidance_start: control_guidance_start 1.0 must be below control_guidance_end 1.0"
    )
    assert errors["strength"] == "parameter strength: task 'controlnet' does not take this parameter"
    assert all("\n" not in e and " at 0x" not in e for e in errors.values())


def test_a_stage_names_the_missing_column(tiny_dir, tmp_path):
    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    _, preprocess, _ = stages(job)
    with pytest.raises(
        C.MissingColumnError, match=r"preprocess stage needs column\(s\) control_image_0; the batch has"
    ):
        preprocess(pd.DataFrame({C.ROW_ID: ["row-0"], C.STATUS: [C.OK]}))


def _encoded(tiny_dir, tmp_path, image_format="png", prompt=PROMPTS[0], **params):
    from pixfleet.config import SinkConfig
    from pixfleet.generation.stages.encode_stage import EncodeStage

    job = job_at_64(tiny_dir, "controlnet", tmp_path, params=params, preprocess={"control": [{"detector": "canny"}]})
    decode, preprocess, generate = stages(job)
    generated = generate(preprocess(decode(canonical_batch(image_columns(job), 1, prompt=prompt))))
    model = ModelIdentity.of(job.model)
    encoded = EncodeStage(SinkConfig(output_dir=str(tmp_path), image_format=image_format), model, job.preprocess)(
        generated
    )
    return generated, encoded, model


def test_png_carries_a1111_parameters_with_model_hash_and_control_preprocessing(tiny_dir, tmp_path):
    generated, encoded, model = _encoded(tiny_dir, tmp_path, negative_prompt="blurry")
    image = Image.open(io.BytesIO(encoded["encoded"][0]))
    np.testing.assert_array_equal(np.asarray(image), generated[C.IMAGE][0])
    prompt, negative, settings = image.info["parameters"].split("\n")
    assert prompt == PROMPTS[0] and negative == "Negative prompt: blurry"
    assert settings.startswith(
        f"Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 11, Size: 64x64, Model hash: {model.base_model_hash[:10]}, "
        "Model: controlnet"
    )
    assert (
        f'ControlNet 0: "Module: canny, Model: controlnet [{model.controlnet_hashes[0][:8]}], Weight: 1.0, '
        "Resize Mode: Crop and Resize, Resample: lanczos, Threshold A: 100, Threshold B: 200, "
        'Guidance Start: 0.0, Guidance End: 1.0, Guess Mode: False"'
    ) in settings
    assert "Prompt truncated" not in settings
    assert (encoded["width"][0], encoded["height"][0]) == (64, 64)


def test_a_prompt_over_77_tokens_is_recorded_as_truncated(tiny_dir, tmp_path):
    long_prompt = " ".join(["word"] * 100)
    generated, encoded, _ = _encoded(tiny_dir, tmp_path, prompt=long_prompt)
    assert generated[C.PROMPT_TRUNCATED][0] and generated[C.PROMPT_TOKENS][0] > 77
    assert "Prompt truncated: True" in encoded["parameters"][0]


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_the_parameters_in_a_standard_user_comment(tiny_dir, tmp_path, image_format):
    """Read back with Pillow's EXIF reader and as A1111 reads it (piexif)."""
    import piexif
    import piexif.helper

    _, encoded, _ = _encoded(tiny_dir, tmp_path, image_format=image_format, prompt="a café ☕")
    data, text = encoded["encoded"][0], encoded["parameters"][0]
    exif = Image.open(io.BytesIO(data)).getexif()
    assert exif.endian == ">"  # big-endian EXIF, so the UTF-16 text is big-endian too
    comment = exif.get_ifd(0x8769)[0x9286]  # Pillow gives bytes for type UNDEFINED (a tuple for BYTE)
    assert comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == text
    loaded = piexif.load(Image.open(io.BytesIO(data)).info["exif"])["Exif"][piexif.ExifIFD.UserComment]
    assert piexif.helper.UserComment.load(loaded) == text


def test_the_plan_checks_every_stage_finds_its_columns(tiny_dir, tmp_path):
    from pixfleet.generation.plan import SOURCE_COLUMNS, check_chain, plan_stages

    job = job_at_64(tiny_dir, "controlnet", tmp_path)
    labels = {"control_image_0": "conditioning_image"}
    planned = plan_stages(job, labels, ModelIdentity.of(job.model), frozenset())
    check_chain(planned, (*SOURCE_COLUMNS, *labels))
    with pytest.raises(C.MissingColumnError, match=r"DecodeStage \(in the plan\) needs column\(s\) row_params"):
        check_chain(planned, (C.ROW_ID, C.SOURCE_REF, C.LOAD_ERRORS, *labels))
    assert [type(s.fn).__name__ if not isinstance(s.fn, type) else s.fn.__name__ for s in planned] == [
        "DecodeStage",
        "PreprocessStage",
        "GenerateStage",
        "EncodeStage",
        "WriteStage",
    ]
    assert planned[2].options["num_cpus"] == job.resources.num_cpus_per_actor  # each stage owns its resources
    assert planned[2].options["compute"].initial_size == job.resources.min_actors


def test_generation_actors_can_all_start_loading_at_once(tiny_dir, tmp_path):
    from pixfleet.generation.plan import plan_stages

    resources = {"min_actors": 1, "max_actors": 8, "initial_actors": 8}
    job = job_at_64(tiny_dir, "controlnet", tmp_path, resources=resources)
    pool = plan_stages(job, {"control_image_0": "x"}, ModelIdentity.of(job.model), frozenset())[2].options["compute"]
    assert (pool.min_size, pool.initial_size, pool.max_size) == (1, 8, 8)
    with pytest.raises(ValueError, match="initial_actors must lie between min_actors and max_actors"):
        job_at_64(tiny_dir, "controlnet", tmp_path, resources={"max_actors": 2, "initial_actors": 3})
