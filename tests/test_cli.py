"""The command line: building tiny models and data, and clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pixfleet.cli import app

runner = CliRunner()


def plain(output: str) -> str:
    """Click's and rich's boxed, wrapped output as one line of words."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


def test_make_tiny_writes_a_loadable_pipeline(tmp_path):
    result = runner.invoke(app, ["models", "make-tiny", "--task", "pix2pix", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"


def test_make_tiny_unknown_task_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["models", "make-tiny", "--task", "video", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "'video' is not one of 'controlnet', 'controlnet_img2img', 'controlnet_inpaint'" in plain(result.output)


def test_the_evaluation_stand_ins_load_where_the_metrics_look(tmp_path):
    import numpy as np

    from pixfleet.evaluation.fid import InceptionFeatures
    from pixfleet.evaluation.metrics import ClipScorer

    for kind, out in (("clip", tmp_path / "clip"), ("inception", tmp_path / "inception.pt")):
        result = runner.invoke(app, ["models", "make-tiny-annotator", "--kind", kind, "--out", str(out)])
        assert result.exit_code == 0, result.output
    image = np.zeros((32, 32, 3), np.uint8)
    assert ClipScorer(str(tmp_path / "clip")).clip_scores([image], ["a circle"]).shape == (1,)
    assert InceptionFeatures(str(tmp_path / "inception.pt"))([image]).shape == (1, 16)


def test_fill50k_command(tmp_path):
    result = runner.invoke(app, ["data", "fill50k", "--n", "3", "--size", "16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "metadata.jsonl").read_text().splitlines()) == 3


def test_generate_with_bad_config_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {task: controlnet, base_model: ./missing, controlnets: [./missing]}\n")
    result = runner.invoke(app, ["generate", str(bad)])
    assert result.exit_code == 2
    assert "field 'model.base_model': path does not exist: ./missing" in result.output


def test_train_with_bad_config_exits_2_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {pretrained_model_name_or_path: ./missing, train_data_dir: ./missing, resolutoin: 64}\n")
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "field 'train.resolutoin': unknown key" in result.output
    assert "field 'train.train_data_dir': path does not exist: ./missing" in result.output


def test_config_show_prints_every_field_with_type_default_and_description():
    result = runner.invoke(app, ["config", "show", "generate", "params.guidance_scale"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "params.guidance_scale: number (>= 0) or null = null",
        "    Classifier-free guidance scale; unset uses the pipeline's own default.",
    ]
    serving = runner.invoke(app, ["config", "show", "serve", "models.N.batching"]).output
    assert "models.N.batching.max_batch_size: integer (>= 1) = 4" in serving
    assert (
        "train.resolution: integer (>= 8, multiple of 8) = 512"
        in runner.invoke(app, ["config", "show", "train"]).output
    )
    unknown = runner.invoke(app, ["config", "show", "generate", "params.stepz"])
    assert unknown.exit_code == 2 and "generate config has no field 'params.stepz'" in unknown.output


def test_config_validate_checks_a_file_without_running_it(project_dir, monkeypatch):
    from tests.config.test_loading import PIPELINES_CFG

    monkeypatch.chdir(project_dir)
    ok = runner.invoke(app, ["config", "validate", str(PIPELINES_CFG / "serve_tiny.yaml")])
    assert ok.exit_code == 0 and ok.output.strip().endswith("serve_tiny.yaml: a valid serve config"), ok.output
    bad = runner.invoke(
        app, ["config", "validate", str(PIPELINES_CFG / "train_tiny.yaml"), "--set", "train.resolution=70"]
    )
    assert bad.exit_code == 2 and "field 'train.resolution': Input should be a multiple of 8" in bad.output
    listed = runner.invoke(
        app, ["config", "validate", str(PIPELINES_CFG / "serve_tiny.yaml"), "--set", "models.1.num_gpus=-1"]
    )
    assert listed.exit_code == 2 and "field 'models.1.num_gpus': Input should be greater than or equal to 0" in (
        listed.output
    )


def test_make_tiny_lists_the_tasks_in_its_help():
    result = runner.invoke(app, ["models", "make-tiny", "--help"], env={"COLUMNS": "400"})
    tasks = "controlnet|controlnet_img2img|controlnet_inpaint|sdxl_controlnet|sdxl_controlnet_img2img"
    assert f"<{tasks}|sdxl_controlnet_inpaint|pix2pix|sdxl_pix2pix>" in result.output


def test_promote_is_refused_for_a_job_that_is_not_an_eval(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("name: x\n")
    result = runner.invoke(app, ["submit", "generate", str(config), "--promote", "champion"])
    assert result.exit_code == 2
    assert "--promote is an eval job's option, not a generate job's" in plain(result.output)


def test_every_command_summary_is_one_line_and_each_example_config_is_shipped():
    import re

    from tests.config.test_loading import PIPELINES_CFG

    commands = ["generate", "annotate", "eval", "gallery", "train", "serve", "submit"]
    examples = []
    for group in ([], ["models"], ["data"], ["jobs"], ["config"]):
        listing = runner.invoke(app, [*group, "--help"], env={"COLUMNS": "400"}).output
        rows = listing[listing.index("Commands") :].splitlines()[1:-1]
        assert all(not row.startswith("│  ") for row in rows), listing  # a summary's second line
    for command in commands:
        examples += re.findall(r"pipelines_cfg/(\S+\.yaml)", runner.invoke(app, [command, "--help"]).output)
    assert examples and all((PIPELINES_CFG / name).is_file() for name in examples), examples
