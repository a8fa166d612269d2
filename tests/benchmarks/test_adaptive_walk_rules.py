"""The stopping-rule replay: its full-grid terms give the engine's scores, its `library` rule the engine's walk."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import load_benchmark_script, write_evaluation_recipe, write_group_folder
from diffusers_guda import GUDADDPMPipeline
from diffusers_guda.cli import main as guda
from diffusers_guda.scoring import ADAPTIVE_BLOCK, ADAPTIVE_HEAD
from guda_lab.queries import load_query_images

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_the_replay_reproduces_the_engines_scores_and_adaptive_answers(tmp_path):
    recipe = write_evaluation_recipe(tmp_path / "recipe.json")
    data = json.loads(recipe.read_text())
    data["elbo"].update(stride=1, t_min=1)  # every timestep: walks long enough to stop early
    recipe.write_text(json.dumps(data))
    out = tmp_path / "eval"
    folder = write_group_folder(tmp_path / "data", ["left", "middle", "right"])
    assert guda(["evaluate", "--data", str(folder), "--out", str(out), "--recipe", str(recipe), "--no-ceiling", "--methods", "guda", "--quiet"]) == 0
    module = load_benchmark_script("adaptive_walk_rules")
    pipe = GUDADDPMPipeline.from_pretrained(out / "base")
    pipe.set_progress_bar_config(disable=True)
    pipe.load_guda_bundle(out / "bundle")
    images = load_query_images(sorted((out / "queries").glob("*.png")))
    terms, est = module.full_grid_terms(pipe, images)
    full = pipe.attribute(images, progress=False)
    assert terms.shape == (len(images), full.scores.shape[1] + 1, est.num_rows)
    torch.testing.assert_close((terms[:, 1:] - terms[:, :1]).mean(2) * est.scale, full.scores.float(), rtol=1e-5, atol=1e-4)
    hashes, grid_rows = est.image_hashes(images), terms.numel()
    head = math.ceil(ADAPTIVE_HEAD * est.num_rows)
    for z in (0.5, 2.0):
        used, top = module.replay(module.walk_rules()["library"], terms, est, hashes, block=ADAPTIVE_BLOCK, z=z, head=head)
        adaptive = pipe.attribute(images, adaptive_z=z, progress=False)
        assert torch.equal(top, adaptive.scores.argmax(1)), z
        assert 0 < used < grid_rows  # the walk stopped early, and its replay with it
