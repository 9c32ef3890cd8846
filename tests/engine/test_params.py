"""Parameters: one validation for configs, job rows and requests; ranges as diffusers checks
them, finite numbers, seeds that fit, and no parameter a task would silently ignore."""

from __future__ import annotations

import inspect

import pytest

from pixfleet.config import GenerationParams
from pixfleet.engine import params
from pixfleet.engine.images import RowError
from pixfleet.engine.params import pipeline_call_defaults, resolve_params
from pixfleet.models.tasks import TASKS, task_info


def resolve(task: str = "controlnet", n: int = 1, defaults: dict | None = None, **row) -> dict:
    return resolve_params(GenerationParams(**(defaults or {})), row, task, n)


def test_unset_parameters_take_the_pipelines_defaults():
    params = resolve("sdxl_controlnet", n=2, prompt="x")
    assert params["num_inference_steps"] == 50 and params["guidance_scale"] == 5.0
    assert params["controlnet_conditioning_scale"] == [1.0, 1.0]
    assert (params["control_guidance_start"], params["control_guidance_end"]) == ([0.0, 0.0], [1.0, 1.0])
    assert params["strength"] is None and params["image_guidance_scale"] is None
    assert resolve("pix2pix")["image_guidance_scale"] == 1.5 and resolve("pix2pix")["guess_mode"] is None


def test_row_values_override_config_defaults_and_one_value_stands_for_every_controlnet():
    params = resolve("sdxl_controlnet", n=2, defaults={"guidance_scale": 3.0}, controlnet_conditioning_scale=0.5)
    assert params["guidance_scale"] == 3.0 and params["controlnet_conditioning_scale"] == [0.5, 0.5]
    assert resolve(seed=2**63 - 1)["seed"] == 2**63 - 1  # int64's largest: exact, no float on the way


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"guidance_scale": float("inf")}, "parameter guidance_scale: Input should be a finite number"),
        ({"guidance_scale": float("nan")}, "parameter guidance_scale: Input should be a finite number"),
        (
            {"controlnet_conditioning_scale": 1e999},
            "parameter controlnet_conditioning_scale.0: Input should be a finite",
        ),
        ({"control_guidance_end": 2}, "parameter control_guidance_end.0: Input should be less than or equal to 1"),
        (
            {"control_guidance_start": 0.9, "control_guidance_end": 0.1},
            "parameter control_guidance_end: control_guidance_start 0.9 must be below control_guidance_end 0.1",
        ),
        (
            {"control_guidance_start": 1.0},
            "parameter control_guidance_start: control_guidance_start 1.0 must be below control_guidance_end 1.0",
        ),
        ({"seed": -1}, "parameter seed: Input should be greater than or equal to 0"),
        ({"seed": 2**64}, "parameter seed: Input should be less than 9223372036854775808"),
        (
            {"seed": 2**63 - 1, "num_images_per_prompt": 2},
            "parameter seed: seed + num_images_per_prompt - 1 must be below 2**63",
        ),
        ({"strength": 0.5}, "parameter strength: task 'controlnet' does not take this parameter"),
        (
            {"controlnet_conditioning_scale": [1.0, 0.5, 0.2]},
            "parameter controlnet_conditioning_scale: 3 values for 2",
        ),
    ],
)
def test_a_bad_row_value_is_one_line_naming_the_parameter(row, message):
    with pytest.raises(RowError) as raised:
        resolve("sdxl_controlnet", n=2, **row)
    assert str(raised.value).startswith(message.replace("'controlnet'", "'sdxl_controlnet'"))


@pytest.mark.parametrize("task", ["pix2pix", "sdxl_pix2pix"])
def test_controlnet_parameters_on_an_instruction_edit_are_refused(task):
    for name, value in {"strength": 0.5, "guess_mode": True, "control_guidance_end": 0.5}.items():
        with pytest.raises(RowError, match=rf"parameter {name}: task '{task}' does not take this parameter"):
            resolve(task, n=0, **{name: value})


@pytest.mark.parametrize("task", list(TASKS))
def test_each_tasks_parameters_are_the_ones_its_pipeline_takes(task):
    """The static lists configs validate against agree with the pipelines' signatures."""
    import inspect

    signature = set(inspect.signature(task_info(task).pipeline_class.__call__).parameters)
    exposed = set(GenerationParams.model_fields) - {"seed"}  # the seed becomes the generators
    assert task_info(task).parameters - {"seed"} == exposed & signature


@pytest.mark.parametrize("task", ["controlnet_inpaint", "sdxl_pix2pix"])
def test_pipeline_defaults_kept_in_the_cache_equal_the_signature_and_a_broken_file_is_read_again(
    task, tmp_path, monkeypatch
):
    monkeypatch.setattr(params, "DEFAULTS_CACHE", tmp_path)
    signature = inspect.signature(task_info(task).pipeline_class.__call__).parameters
    expected = {n: signature[n].default for n in GenerationParams.model_fields if n in signature}
    expected = {n: v for n, v in expected.items() if v is not inspect.Parameter.empty}
    for broken in (False, True):
        pipeline_call_defaults.cache_clear()
        assert pipeline_call_defaults(task) == expected  # computed and written, then read back
        (cached,) = tmp_path.glob(f"diffusers-*/{task}.json")
        if broken:
            cached.write_text("{not json")
    pipeline_call_defaults.cache_clear()
    assert pipeline_call_defaults(task) == expected and cached.read_text().startswith("{")
    pipeline_call_defaults.cache_clear()
