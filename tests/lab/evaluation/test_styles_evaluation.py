"""``run_evaluation`` and ``guda evaluate --benchmark digits-styles`` end to end on a text-conditioned model (micro recipe)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from diffusers_guda.cli import main
from diffusers_guda.models import is_conditional
from diffusers_guda.pipelines.text_to_image import GUDATextToImagePipeline
from guda_lab.evaluation import DASConfig, DTRAKConfig, GradientConfig, InstanceUnlearningConfig
from guda_lab.evaluation.digits_styles import STYLES, digits_styles
from guda_lab.evaluation.runner import METHODS, run_evaluation

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
RECIPE = Path(__file__).resolve().parents[3] / "adapters" / "digits-styles.json"
NUM_QUERIES = 4


def micro_recipe(path: Path) -> Path:
    """The digits-styles recipe, shrunk: a 2-level UNet, 5 training steps, 2 unlearning steps, a 4-point grid."""
    recipe = json.loads(RECIPE.read_text())
    recipe["train"].update(steps=5, batch_size=8, warmup_steps=1, block_out_channels=[32, 32], num_train_timesteps=100)
    recipe["unlearning"].update(steps=2, forget_batch_size=4, retain_batch_size=4, eval_images=4, eval_draws=1)
    recipe["elbo"] = {"stride": 25, "t_min": 10, "seed": 0}
    recipe["queries"] = {"num_queries": NUM_QUERIES, "seed": 0, "num_inference_steps": 3}
    path.write_text(json.dumps(recipe))
    return path


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("styles-eval")
    recipe = micro_recipe(root / "recipe.json")
    dataset = digits_styles(images_per_digit=8)
    report = run_evaluation(root / "out", dataset, recipe, progress=False, log=lambda msg: None,
                            gradient_config=GradientConfig(timesteps=(50,), projection_dim=16),
                            dtrak_config=DTRAKConfig(timesteps=(50,), projection_dim=16), das_config=DASConfig(timesteps=(50,), projection_dim=16),
                            instance_config=InstanceUnlearningConfig(timesteps=(50,), steps=1))
    return {"out": root / "out", "report": report, "dataset": dataset, "recipe": recipe}


def test_report_structure(evaluation):
    report, out = evaluation["report"], evaluation["out"]
    assert report["groups"] == list(STYLES) and report["group_sizes"] == [20, 20, 20, 20]
    assert report["num_queries"] == NUM_QUERIES
    assert set(report["methods"]) == {"logo_seed_b", *METHODS}
    assert report["recipe"]["train"]["conditioning"] == "text"
    assert report["recipe"]["unlearning"]["objective"] == "anchor"
    prompts = report["query_prompts"]
    assert len(prompts) == NUM_QUERIES and set(prompts) <= set(evaluation["dataset"].prompts)
    assert json.loads((out / "queries.json").read_text())["prompts"] == prompts
    subsets = report["prompt_subsets"]
    assert sum(entry["n"] for entry in subsets.values()) == NUM_QUERIES
    named = subsets["prompt names a group"]["methods"]
    assert set(named) == {"logo_seed_a", "logo_seed_b", *METHODS} and "label_top1" in named["logo_seed_a"]
    markdown = (out / "report.md").read_text()
    assert "By query prompt" in markdown and "| guda |" in markdown
    for name in ("metrics.png", "score_heatmaps.png"):
        assert (out / name).stat().st_size > 0


def test_every_method_scored_every_query_and_group(evaluation):
    out = evaluation["out"]
    for method in ("logo_seed_a", "logo_seed_b", *METHODS):
        stored = json.loads((out / "scores" / f"{method}.json").read_text())
        scores = np.asarray(stored["scores"])
        assert scores.shape == (NUM_QUERIES, len(STYLES)), method
        assert np.isfinite(scores).all() and np.ptp(scores) > 0, method
        assert stored["key"]["query_prompts"] == evaluation["report"]["query_prompts"]


def test_models_are_text_conditioned(evaluation):
    out = evaluation["out"]
    pipe = GUDATextToImagePipeline.from_pretrained(out / "base")
    assert is_conditional(pipe.unet)
    left_out = sorted(json.loads((p / "guda_train.json").read_text())["excluded_group"] for p in (out / "logo" / "seed_0").iterdir())
    assert left_out == sorted(STYLES)
    manifest = json.loads((out / "bundle" / "guda_bundle.json").read_text())
    assert manifest["base_model"]["conditional"] is True


def test_rerun_reuses_everything(evaluation):
    lines = []
    again = run_evaluation(evaluation["out"], evaluation["dataset"], evaluation["recipe"], progress=False, log=lines.append,
                           gradient_config=GradientConfig(timesteps=(50,), projection_dim=16),
                           dtrak_config=DTRAKConfig(timesteps=(50,), projection_dim=16), das_config=DASConfig(timesteps=(50,), projection_dim=16),
                           instance_config=InstanceUnlearningConfig(timesteps=(50,), steps=1))
    assert all(stage.get("reused") for stage in again["cost"].values())
    assert again["methods"] == evaluation["report"]["methods"]


def test_cli_benchmark(tmp_path):
    recipe = micro_recipe(tmp_path / "recipe.json")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["evaluate", "--benchmark", "digits-styles", "--out", str(tmp_path / "eval"), "--recipe", str(recipe),
                     "--queries", "2", "--methods", "guda", "similarity", "--no-ceiling", "--quiet", "--threads", "1"])
    assert code in (0, None), err.getvalue()
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["groups"] == list(STYLES) and sum(report["group_sizes"]) == 1797
    assert set(report["methods"]) == {"guda", "similarity"}
    assert len(report["query_prompts"]) == 2


def test_text_recipe_needs_prompts(tmp_path):
    from diffusers_guda import ConfigError, load_digits

    with pytest.raises(ConfigError, match="no prompts"):
        run_evaluation(tmp_path / "x", load_digits(), micro_recipe(tmp_path / "r.json"), progress=False, log=lambda m: None)
