"""Every shipped YAML validates; bad configs fail with one line naming the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pixfleet.config import ConfigError, GenerationJobConfig, load_config
from pixfleet.config.annotation import AnnotateJobConfig
from pixfleet.config.evaluation import EvalJobConfig
from pixfleet.config.serving import ServingConfig
from pixfleet.config.training import TrainingJobConfig

PIPELINES_CFG = Path(__file__).resolve().parents[2] / "pipelines_cfg"
GENERATION_YAMLS = sorted(
    p for p in PIPELINES_CFG.glob("*.yaml") if not p.name.startswith(("train_", "serve_", "annotate_", "eval_"))
)
ANNOTATE_YAMLS = sorted(PIPELINES_CFG.glob("annotate_*.yaml"))
TRAINING_YAMLS = sorted(PIPELINES_CFG.glob("train_*.yaml"))
SERVING_YAMLS = sorted(PIPELINES_CFG.glob("serve_*.yaml"))
EVAL_YAMLS = sorted(PIPELINES_CFG.glob("eval_*.yaml"))


def test_the_seed_pipelines_are_shipped():
    names = {p.stem for p in GENERATION_YAMLS}
    assert {
        "quickstart",
        "sd15_canny",
        "sd15_controlnet_img2img",
        "sd15_controlnet_inpaint",
        "sdxl_multicontrolnet",
        "sdxl_controlnet_img2img",
        "sdxl_controlnet_inpaint",
        "pix2pix_edit",
        "sdxl_pix2pix",
    } <= names


@pytest.mark.parametrize("path", GENERATION_YAMLS, ids=lambda p: p.stem)
def test_every_pipeline_yaml_validates(project_dir, monkeypatch, path):
    monkeypatch.chdir(project_dir)
    job = load_config(GenerationJobConfig, path)
    assert job.name == path.stem
    assert job.model.task in path.read_text()


@pytest.mark.usefixtures("ray_session")
def test_every_pipeline_yaml_finds_its_columns_in_the_demo_data(project_dir, monkeypatch):
    """What `make demo` writes (outputs/fill50k) holds every column the shipped jobs read: each
    opens its source as a run would, before any model is loaded."""
    from pixfleet.generation.sources import open_source

    monkeypatch.chdir(project_dir)
    for path in GENERATION_YAMLS:
        job = load_config(GenerationJobConfig, path)
        source = open_source(job.source, job.model.task, len(job.model.controlnets), rows_per_block=4)
        assert source.num_rows == 16, path.name


@pytest.mark.parametrize("path", TRAINING_YAMLS, ids=lambda p: p.stem)
def test_every_training_yaml_validates(project_dir, monkeypatch, path):
    monkeypatch.chdir(project_dir)
    job = load_config(TrainingJobConfig, path)
    assert job.name == path.stem
    assert job.registry.alias == "champion"


@pytest.mark.parametrize("path", ANNOTATE_YAMLS, ids=lambda p: p.stem)
def test_every_annotate_yaml_validates(project_dir, monkeypatch, path):
    monkeypatch.chdir(project_dir)
    job = load_config(AnnotateJobConfig, path)
    assert job.name == path.stem
    assert job.detector.detector == "depth" and job.caption.model


@pytest.mark.parametrize("path", EVAL_YAMLS, ids=lambda p: p.stem)
def test_every_eval_yaml_validates(project_dir, monkeypatch, path):
    monkeypatch.chdir(project_dir)
    job = load_config(EvalJobConfig, path)
    assert [entry.name for entry in job.models] == ["champion", "challenger"]
    assert job.promotion.primary == "control_0.edge_f1" and "clip_score" in job.promotion.guards


def test_the_16_12_and_8_gb_recipes_of_train_controlnet_are_shipped(project_dir, monkeypatch):
    monkeypatch.chdir(project_dir)
    recipes = {
        size: load_config(TrainingJobConfig, PIPELINES_CFG / f"train_sd15_canny{suffix}.yaml")
        for size, suffix in ((16, "_16gb"), (12, "_12gb"), (8, ""))
    }
    assert all(job.train.gradient_checkpointing for job in recipes.values())
    assert recipes[16].train.use_8bit_adam and recipes[16].distributed.strategy == "ddp"
    twelve = recipes[12].train
    assert twelve.use_8bit_adam and twelve.set_grads_to_none and twelve.enable_xformers_memory_efficient_attention
    eight = recipes[8]
    assert eight.distributed.strategy == "deepspeed" and eight.distributed.zero_stage == 2
    assert eight.distributed.offload_optimizer and eight.train.mixed_precision == "fp16"


@pytest.mark.parametrize("path", SERVING_YAMLS, ids=lambda p: p.stem)
def test_every_serving_yaml_validates(project_dir, monkeypatch, path):
    monkeypatch.chdir(project_dir)
    config = load_config(ServingConfig, path)
    assert config.name == path.stem
    assert {m.model.task for m in config.models} == {"controlnet", "pix2pix"}


def test_training_config_refuses_offload_param_below_zero_3(project_dir, monkeypatch):
    monkeypatch.chdir(project_dir)
    with pytest.raises(ConfigError, match=r"train_tiny.yaml: field 'distributed': offload_param needs zero_stage: 3"):
        load_config(TrainingJobConfig, PIPELINES_CFG / "train_tiny.yaml", ["distributed.offload_param=true"])


def test_multicontrolnet_yaml_carries_one_scale_per_controlnet(project_dir, monkeypatch):
    monkeypatch.chdir(project_dir)
    job = load_config(GenerationJobConfig, PIPELINES_CFG / "sdxl_multicontrolnet.yaml")
    assert job.model.num_controlnets == 2
    assert job.params.controlnet_conditioning_scale == [1.0, 0.8]


def _write(tmp_path, project_dir, edit) -> Path:
    data = yaml.safe_load((PIPELINES_CFG / "quickstart.yaml").read_text())
    data["model"]["base_model"] = str(project_dir / "outputs/tiny/controlnet")
    data["model"]["controlnets"] = [str(project_dir / "outputs/tiny/controlnet/controlnet")]
    data["source"]["path"] = str(project_dir / "outputs/fill50k")
    edit(data)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["model"].update(bogus=1), r"field 'model\.bogus': unknown key"),
        (
            lambda d: d["params"].update(num_inference_steps="many"),
            r"field 'params\.num_inference_steps': Input should be a valid integer",
        ),
        (
            lambda d: d["model"].update(base_model="./no/such/folder"),
            r"field 'model\.base_model': path does not exist: \./no/such/folder",
        ),
        (
            lambda d: d["source"].update(path="/no/such/data"),
            r"field 'source\.path': path does not exist: /no/such/data",
        ),
        (lambda d: d["model"].update(task="txt2video"), r"field 'model\.task': Input should be"),
        (
            lambda d: d["params"].update(controlnet_conditioning_scale=[1.0, 0.5]),
            r"controlnet_conditioning_scale has 2 values for 1 controlnet",
        ),
        (
            lambda d: d["model"].update(controlnets=[]),
            r"field 'model': task 'controlnet' needs at least one entry in 'controlnets'",
        ),
        (
            lambda d: d["preprocess"].update(width=65),
            r"field 'preprocess\.width': must be a multiple of 8",
        ),
        (lambda d: d["params"].update(guidance_scale=float("inf")), r"'params\.guidance_scale': .* finite number"),
        (lambda d: d["params"].update(control_guidance_end=2), r"'params\.control_guidance_end\.0': .* less than or"),
        (
            lambda d: d["params"].update(control_guidance_start=0.9, control_guidance_end=0.1),
            r"control_guidance_start 0\.9 must be below control_guidance_end 0\.1",
        ),
        (
            lambda d: d["params"].update(image_guidance_scale=1.5),
            r"job\.yaml: params\.image_guidance_scale: task 'controlnet' does not take this parameter",
        ),
        (lambda d: d.update(seed=2**63), r"field 'seed': Input should be less than 9223372036854775808"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path, project_dir, edit, message):
    path = _write(tmp_path, project_dir, edit)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(GenerationJobConfig, path)
    assert str(error.value).startswith(str(path))


def test_training_resolution_must_be_a_multiple_of_8(project_dir, monkeypatch):
    monkeypatch.chdir(project_dir)
    with pytest.raises(ConfigError, match=r"field 'train\.resolution': Input should be a multiple of 8"):
        load_config(TrainingJobConfig, PIPELINES_CFG / "train_tiny.yaml", ["train.resolution=70"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(GenerationJobConfig, tmp_path / "nope.yaml")


def test_set_overrides_parse_values_as_yaml(tmp_path, project_dir):
    path = _write(tmp_path, project_dir, lambda d: None)
    job = load_config(
        GenerationJobConfig,
        path,
        ["params.num_inference_steps=7", "params.guess_mode=true", "sink.image_format=webp"],
    )
    assert job.params.num_inference_steps == 7
    assert job.params.guess_mode is True
    assert job.sink.image_format == "webp"


def test_set_overrides_reach_list_items(project_dir, monkeypatch):
    from pixfleet.config.serving import ServingConfig

    monkeypatch.chdir(project_dir)
    config = load_config(
        ServingConfig,
        PIPELINES_CFG / "serve_tiny.yaml",
        [
            "models.0.num_gpus=1",
            "models.1.batching.max_batch_size=2",
            "models.0.model.controlnets.0=./outputs/tiny/controlnet/controlnet",
        ],
    )
    assert config.models[0].num_gpus == 1 and config.models[1].batching.max_batch_size == 2
    job = load_config(
        GenerationJobConfig,
        PIPELINES_CFG / "quickstart.yaml",
        ["model.controlnets.1=./outputs/tiny/controlnet/controlnet", "preprocess.control.0.detector=canny"],
    )
    assert job.model.num_controlnets == 2 and job.preprocess.control[0].detector == "canny"
    with pytest.raises(ConfigError, match=r"'5' is not an index of the list \(0 to 1, or 2 to add an item\)"):
        load_config(ServingConfig, PIPELINES_CFG / "serve_tiny.yaml", ["models.5.num_gpus=1"])


def test_set_override_of_unknown_key_is_refused(tmp_path, project_dir):
    path = _write(tmp_path, project_dir, lambda d: None)
    with pytest.raises(ConfigError, match=r"field 'params\.stepz': unknown key"):
        load_config(GenerationJobConfig, path, ["params.stepz=3"])


def test_every_field_is_documented():
    from pydantic import BaseModel

    seen, pending = set(), [GenerationJobConfig, TrainingJobConfig, ServingConfig]
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            for arg in getattr(field.annotation, "__args__", (field.annotation,)):
                inner = getattr(arg, "__args__", (arg,))
                pending += [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
    assert len(seen) >= 20
