"""train_controlnet.py's flags under their own names: what each maps to here, or why it is refused;
and the data layouts `datasets` accepts."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from pixfleet.config.training import TrainingJobConfig
from pixfleet.data.tables import RowLocator, load_dataset_table, plan_table
from pixfleet.storage import Location

COLUMNS = {"image_column": "image", "conditioning_image_column": "conditioning_image", "caption_column": "text"}
IMAGES = {"image", "conditioning_image"}


def job(**train) -> TrainingJobConfig:
    return TrainingJobConfig.model_validate({"train": {"pretrained_model_name_or_path": "org/base", **train}})


def test_every_flag_of_the_script_is_accepted_under_its_name(fill50k_dir, tmp_path):
    flags = {
        "report_to": "tensorboard",
        "dataset_name": str(fill50k_dir),
        "dataset_config_name": None,
        "tokenizer_name": "openai/clip-vit-large-patch14",
        "cache_dir": str(tmp_path / "cache"),
        "dataloader_num_workers": 2,
        "allow_tf32": True,
        "logging_dir": "tb",
        "push_to_hub": False,
        "hub_model_id": None,
        "hub_token": None,
        "tracker_project_name": "controlnet-depth",
        "mixed_precision": None,
    }
    config = job(**flags)
    assert config.train.mixed_precision == "no"  # the script's None: no autocast
    assert config.tracking.experiment == "controlnet-depth"  # its tracker project is the MLflow experiment


@pytest.mark.parametrize("flag, value", [("push_to_hub", True), ("hub_model_id", "me/cn"), ("hub_token", "hf_x")])
def test_hub_flags_are_refused_pointing_at_the_registry(fill50k_dir, flag, value):
    with pytest.raises(ValidationError, match=rf"{flag}: no model hub is reachable .* registry\.model_name"):
        job(train_data_dir=str(fill50k_dir), **{flag: value})


def test_data_comes_from_one_place_and_the_experiment_is_named_once(fill50k_dir):
    with pytest.raises(ValidationError, match=r"set one of train_data_dir .* and dataset_name"):
        job(train_data_dir=str(fill50k_dir), dataset_name="fill50k")
    with pytest.raises(ValidationError, match="set one of train_data_dir"):
        job()
    with pytest.raises(ValidationError, match="name two experiments"):
        TrainingJobConfig.model_validate(
            {
                "train": {"pretrained_model_name_or_path": "b", "dataset_name": "d", "tracker_project_name": "a"},
                "tracking": {"experiment": "b"},
            }
        )


def test_a_folder_of_parquet_files_reads_as_load_dataset_reads_it(fill50k_dir, tmp_path):
    rows = pd.read_json(fill50k_dir / "metadata.jsonl", lines=True)
    table = pd.DataFrame(
        {
            "image": [(fill50k_dir / f).read_bytes() for f in rows["file_name"]],
            "conditioning_image": [(fill50k_dir / f).read_bytes() for f in rows["conditioning_image_file_name"]],
            "text": rows["text"],
        }
    )
    hub_layout = tmp_path / "hub" / "data"
    hub_layout.mkdir(parents=True)
    table.iloc[:10].to_parquet(hub_layout / "train-00000-of-00002.parquet")
    table.iloc[10:].to_parquet(hub_layout / "train-00001-of-00002.parquet")
    plan = plan_table(Location.of(tmp_path / "hub"), COLUMNS, IMAGES, field="train.train_data_dir")
    assert plan.num_rows == len(table)  # from the parquet footers
    loaded = RowLocator(plan).rows(range(len(table)))
    assert loaded["source_ref"][10] == "train-00001-of-00002.parquet:1"
    assert loaded["image"][12] == table["image"][12] and list(loaded["text"]) == list(table["text"])

    flat = tmp_path / "flat"
    flat.mkdir()
    table.to_parquet(flat / "part.parquet")
    assert plan_table(Location.of(flat), COLUMNS, IMAGES, field="train.train_data_dir").num_rows == len(table)


def test_dataset_name_goes_through_load_dataset(fill50k_dir, tmp_path):
    plan = load_dataset_table(str(fill50k_dir), None, str(tmp_path / "cache"), COLUMNS, IMAGES, "train.dataset_name")
    loaded = RowLocator(plan).rows(range(4))
    first = loaded["image"][0]
    assert (
        plan.num_rows == len(pd.read_json(fill50k_dir / "metadata.jsonl", lines=True))
        and isinstance(first, bytes | str)
        and loaded["text"][0] == pd.read_json(fill50k_dir / "metadata.jsonl", lines=True)["text"][0]
    )
    with pytest.raises(Exception, match=r"train\.dataset_name .*: load_dataset failed"):
        load_dataset_table(str(tmp_path / "missing"), None, None, COLUMNS, IMAGES, "train.dataset_name")
