"""``run_evaluation`` and ``guda evaluate`` on the flow-matching benchmarks (micro recipes): the
text-conditioned ``digits-styles-flow`` and the unconditional ``digits-styles-flow-uncond``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_guda import Recipe
from diffusers_guda.cli import main
from diffusers_guda.models import is_conditional
from guda_lab.evaluation import DASConfig, DTRAKConfig, GradientConfig, InstanceUnlearningConfig
from guda_lab.evaluation.benchmarks import get_benchmark
from guda_lab.evaluation.digits_styles import STYLES
from guda_lab.evaluation.methods import model_classes
from guda_lab.evaluation.runner import CEILING, METHODS, REFERENCE, run_evaluation

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
ADAPTERS = Path(__file__).resolve().parents[3] / "adapters"
BENCHMARKS = ("digits-styles-flow", "digits-styles-flow-uncond")
NUM_QUERIES = 4


def micro_recipe(name: str, path: Path) -> Path:
    """A flow benchmark's recipe, shrunk: a 2-level UNet, 5 training steps, 2 unlearning steps, a 4-point σ grid, 3 Euler steps."""
    recipe = json.loads((ADAPTERS / f"{name}.json").read_text())
    recipe["train"].update(steps=5, batch_size=8, warmup_steps=1, block_out_channels=[32, 32])
    recipe["unlearning"].update(steps=2, forget_batch_size=4, retain_batch_size=4, eval_images=4, eval_draws=1)
    recipe["elbo"] = {"grid_size": 4, "seed": 0}
    recipe["queries"] = {"num_queries": NUM_QUERIES, "seed": 0, "num_inference_steps": 3}
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module", params=BENCHMARKS)
def evaluation(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    recipe = micro_recipe(name, root / "recipe.json")
    dataset = get_benchmark(name).loader(images_per_digit=8)
    report = run_evaluation(root / "out", dataset, recipe, progress=False, log=lambda msg: None, benchmark=name,
                            gradient_config=GradientConfig(timesteps=(500,), projection_dim=16),
                            dtrak_config=DTRAKConfig(timesteps=(500,), projection_dim=16), das_config=DASConfig(timesteps=(500,), projection_dim=16),
                            instance_config=InstanceUnlearningConfig(timesteps=(500,), steps=1))
    return {"name": name, "out": root / "out", "report": report, "dataset": dataset}


def test_the_benchmarks_are_the_styles_with_flow_recipes():
    for name in BENCHMARKS:
        benchmark = get_benchmark(name)
        assert benchmark.recipe == name and (ADAPTERS / f"{name}.json").is_file()
        assert json.loads((ADAPTERS / f"{name}.json").read_text())["train"]["scheduler"] == "flow"
    conditional, unconditional = (get_benchmark(n).loader(images_per_digit=8) for n in BENCHMARKS)
    assert conditional.prompts is not None and unconditional.prompts is None
    assert unconditional.group_names == conditional.group_names == list(STYLES)
    assert np.array_equal(unconditional.images.numpy(), conditional.images.numpy())
    assert np.array_equal(unconditional.group_ids.numpy(), conditional.group_ids.numpy())


def test_the_contributors_flow_benchmark_is_the_contributors_with_a_size_scaled_flow_recipe():
    benchmark, ddpm = get_benchmark("digits-contributors-flow"), get_benchmark("digits-contributors")
    a, b = benchmark.load(), ddpm.load()
    assert a.group_names == b.group_names and torch.equal(a.images, b.images) and a.prompts is None
    assert benchmark.comparisons is ddpm.comparisons
    recipe = Recipe.load(benchmark.recipe)
    assert recipe.train["scheduler"] == "flow" and recipe.unlearning.objective == "retrack"
    sizes = a.group_sizes()
    steps = [recipe.unlearning.steps_for(n, sum(sizes) / len(sizes)) for n in sizes]
    assert steps[a.group_index("thick-strokes")] > recipe.unlearning.steps > steps[a.group_index("sevens-small")]


def test_every_model_is_a_flow_model_and_every_method_scores(evaluation):
    out, report = evaluation["out"], evaluation["report"]
    conditional = evaluation["name"] == "digits-styles-flow"
    pipeline_class = model_classes(conditional)[0]
    for path in (out / "base", *sorted((out / "logo" / "seed_0").iterdir()), *sorted((out / "logo" / "seed_1").iterdir())):
        pipe = pipeline_class.from_pretrained(path)
        assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and is_conditional(pipe.unet) == conditional, path
    assert report["ceiling"] == CEILING and set(report["methods"]) == {CEILING, *METHODS}
    assert json.loads((out / "queries.json").read_text())["num_inference_steps"] == 3
    for method in (REFERENCE, CEILING, *METHODS):
        scores = np.asarray(json.loads((out / "scores" / f"{method}.json").read_text())["scores"])
        assert scores.shape == (NUM_QUERIES, len(STYLES)) and np.isfinite(scores).all() and np.ptp(scores) > 0, method
    manifest = json.loads((out / "bundle" / "guda_bundle.json").read_text())
    assert manifest["elbo"]["grid_size"] == 4 and manifest["base_model"]["conditional"] is conditional
    assert (report["query_prompts"] is not None) == conditional


def test_cli_runs_a_flow_benchmark_with_the_ceiling(tmp_path):
    recipe = micro_recipe("digits-styles-flow-uncond", tmp_path / "recipe.json")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", "--benchmark", "digits-styles-flow-uncond", "--out", str(tmp_path / "eval"), "--recipe", str(recipe),
                     "--queries", "2", "--methods", "guda", "nearest_neighbour", "--quiet", "--threads", "1"])
    assert code in (0, None), err.getvalue()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["groups"] == list(STYLES) and sum(report["group_sizes"]) == 1797
    assert set(report["methods"]) == {CEILING, "guda", "nearest_neighbour"} and report["query_prompts"] is None
