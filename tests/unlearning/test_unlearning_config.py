"""Tests of diffusers_guda.unlearning.config: validation and the step budget."""

from __future__ import annotations

import pytest

from diffusers_guda import LoRASettings, UnlearningConfig
from diffusers_guda.errors import ConfigError

from unlearning_helpers import small_config


def test_unknown_objective_lists_the_available_ones():
    with pytest.raises(ConfigError) as info:
        small_config(objective="nope", objective_options={})
    message = str(info.value)
    assert "'nope'" in message
    assert "retrack" in message and "gradient_ascent" in message


def test_unknown_objective_option_is_refused():
    with pytest.raises(ConfigError, match="no option"):
        small_config(objective_options={"num_neighbours_typo": 2})


@pytest.mark.parametrize(
    "overrides",
    [dict(learning_rate=0.0), dict(steps=0), dict(forget_batch_size=0), dict(retain_batch_size=0), dict(size_exponent=-1.0)],
)
def test_invalid_numbers_are_refused(overrides):
    with pytest.raises(ConfigError):
        small_config(**overrides)


def test_lora_settings_given_as_dict():
    config = small_config(lora={"rank": 3, "alpha": 6.0})
    assert isinstance(config.lora, LoRASettings) and config.lora.rank == 3


def test_steps_for_and_describe_steps():
    assert UnlearningConfig(steps=40, size_exponent=0.5).steps_for(36, 9.0) == 80
    assert UnlearningConfig(steps=40).describe_steps() == "40 steps each"
    assert UnlearningConfig(steps=120, size_exponent=1.0).describe_steps() == "120 steps at the mean group size, ∝ size^1"
    assert UnlearningConfig(steps=40).steps_for(3, 9.0) == 40  # exponent 0: every group gets `steps`
    assert UnlearningConfig(steps=4, size_exponent=1.0).steps_for(1, 9.0) == 1  # never fewer than one


def test_to_dict_is_json_and_round_trips():
    config = small_config(autocast_dtype="bfloat16", max_grad_norm=None)
    data = config.to_dict()
    assert data["lora"] == {"rank": 2, "alpha": 2.0, "target_modules": list(LoRASettings().target_modules)}
    assert UnlearningConfig(**data) == config


def test_bad_autocast_dtype_is_refused():
    with pytest.raises(ConfigError, match="autocast_dtype"):
        small_config(autocast_dtype="float64")


def test_autocast_auto_is_bfloat16_on_cuda_and_none_elsewhere():
    config = small_config()
    assert config.autocast_dtype == "auto"
    assert config.for_device("cuda").autocast_dtype == "bfloat16"
    assert config.for_device("cuda:1").autocast_dtype == "bfloat16"
    assert config.for_device("cpu").autocast_dtype is None
    assert config.for_device("mps").autocast_dtype is None
    explicit = small_config(autocast_dtype=None)
    assert explicit.for_device("cuda") is explicit  # an explicit choice is kept
    assert small_config(autocast_dtype="float16").for_device("cpu").autocast_dtype == "float16"


def test_unknown_autocast_dtype_is_refused():
    with pytest.raises(ConfigError, match="autocast_dtype must be one of"):
        small_config(autocast_dtype="fp8")
