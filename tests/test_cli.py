"""The command line: building tiny models and data, and clear errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from pixfleet.cli import app

runner = CliRunner()


def test_make_tiny_writes_a_loadable_pipeline(tmp_path):
    result = runner.invoke(app, ["models", "make-tiny", "--task", "pix2pix", "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"


def test_make_tiny_unknown_task_is_one_clear_line(tmp_path):
    result = runner.invoke(app, ["models", "make-tiny", "--task", "video", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown task 'video'; known tasks: controlnet" in result.output


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
