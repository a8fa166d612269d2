"""The joint-unlearning benchmark: it times sequential and joint loops on the same groups and reports
how far the joint adapters are from the sequential ones."""

from __future__ import annotations

import json

import pytest

from conftest import load_benchmark_script

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_rows_compare_joint_loops_with_the_sequential_one(tiny_recipe, tmp_path, capsys):
    module = load_benchmark_script("joint_unlearning")
    saved = tmp_path / "joint.json"
    result = module.main(["--recipe", str(tiny_recipe), "--joint", "5", "--steps", "2", "--batch-size", "2", "--repeats", "1",
                          "--save", str(saved)])
    assert json.loads(saved.read_text()) == result
    assert result["groups"] == 10 and result["batch"] == [2, 2]
    sequential, joint = result["rows"]  # the sequential baseline is always measured first
    assert (sequential["joint_groups"], joint["joint_groups"]) == (1, 5)
    assert sequential["speedup"] == 1.0 and sequential["max_adapter_diff"] == 0.0
    assert joint["max_adapter_diff"] < 1e-3  # rounding, not another adapter
    assert result["group_steps"] >= 10  # at least one step per group, 2 for a group of the mean size
    assert joint["per_group_step_s"] == pytest.approx(joint["wall_s"] / result["group_steps"])
    assert "vs sequential" in capsys.readouterr().out
