"""The DeepSpeed config generated from the typed config, and setups refused before any work."""

from __future__ import annotations

import json

import pytest

from pixfleet.config.training import ControlNetTrainingArgs, DistributedConfig
from pixfleet.training.strategies import TrainingSetupError, check_setup, deepspeed_config


def _args(tmp_path, **values) -> ControlNetTrainingArgs:
    return ControlNetTrainingArgs(pretrained_model_name_or_path="org/model", train_data_dir=str(tmp_path), **values)


def test_the_generated_config_follows_the_typed_fields(tmp_path):
    args = _args(
        tmp_path, train_batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.5, mixed_precision="bf16"
    )
    config = deepspeed_config(args, DistributedConfig(zero_stage=2, offload_optimizer=True), learning_rate=1e-4)
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["lr"] == 1e-4


def test_a_user_json_overrides_keys_deeply(tmp_path):
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 2.0}))
    config = deepspeed_config(_args(tmp_path), DistributedConfig(deepspeed_config=str(override)), learning_rate=1e-5)
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}
    assert config["gradient_clipping"] == 2.0


@pytest.mark.parametrize(
    ("values", "distributed", "message"),
    [
        ({"use_8bit_adam": True}, {"strategy": "ddp"}, "use_8bit_adam needs bitsandbytes on a CUDA GPU"),
        ({"use_8bit_adam": True}, {"strategy": "deepspeed"}, "DeepSpeed brings its own AdamW"),
        ({"mixed_precision": "fp16"}, {"strategy": "ddp"}, "fp16 needs a GPU"),
    ],
)
def test_setups_that_cannot_run_on_cpu_are_refused(tmp_path, values, distributed, message):
    with pytest.raises(TrainingSetupError, match=message):
        check_setup(_args(tmp_path, **values), DistributedConfig(**distributed))
