"""The base-convergence benchmark: a stratified held-out split, one model per step count (reused on a
rerun), and paired held-out likelihood changes."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import load_benchmark_script
from diffusers_guda.data import load_digits


def test_split_holds_out_every_tenth_image_of_each_digit():
    module = load_benchmark_script("base_convergence")
    digits = load_digits()
    train, held = module.split(digits, seed=0)
    expected = sum(-(-n // module.HELD_OUT_EVERY) for n in digits.group_sizes())
    assert len(held) == expected and len(train) + len(held) == len(digits)
    assert train.group_names == digits.group_names
    train_again, held_again = module.split(digits, seed=0)
    assert torch.equal(held, held_again) and not torch.equal(held, module.split(digits, seed=1)[1])


def test_rows_pair_each_step_count_with_the_previous_and_reuse_models(tiny_recipe, tmp_path, capsys):
    module = load_benchmark_script("base_convergence")
    work, saved = tmp_path / "work", tmp_path / "rows.json"
    argv = ["--recipe", str(tiny_recipe), "--steps", "2", "4", "--work", str(work), "--out", str(saved)]
    rows = module.main(argv)
    assert json.loads(saved.read_text()) == json.loads(json.dumps(rows))
    assert [r["steps"] for r in rows] == [2, 4] and rows[0]["held_out_change"] is None
    # the same noise for every model, so the paired change is the difference of the means
    assert rows[1]["held_out_change"][0] == pytest.approx(rows[1]["held_out"][0] - rows[0]["held_out"][0], rel=1e-4)
    logs = {p: p.read_text() for p in work.glob("steps_*/guda_train.json")}
    assert len(logs) == 2
    assert module.main(argv) == rows  # reused, not retrained: the same numbers and logs
    assert {p: p.read_text() for p in work.glob("steps_*/guda_train.json")} == logs
    assert "| 4 |" in capsys.readouterr().out
