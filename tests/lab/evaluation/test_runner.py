"""Tests of ``guda evaluate`` / :func:`run_evaluation`: report layout, reuse on a rerun, errors."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE, write_evaluation_recipe, write_group_folder

from diffusers_guda import AdapterBundle, GUDADDPMPipeline
from diffusers_guda.cli import main
from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError
from diffusers_guda.recipes import Recipe
from diffusers_guda.unlearning import STATS_NAME
from guda_lab.evaluation.benchmarks import Benchmark, GroupComparison, get_benchmark, load_benchmark
from guda_lab.evaluation.metrics import METRIC_NAMES
from guda_lab.evaluation.report import format_markdown, group_level
from guda_lab.evaluation.runner import METHODS, Evaluation, logo_subset, run_evaluation
from guda_lab.queries import load_query_images
from guda_lab.reuse import PARTIAL_BUNDLE

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES = ("base", "logo_seed_a", "logo_seed_b", "guda_unlearning", "logo_seed_a_scoring", "logo_seed_b_scoring", *METHODS)


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, out, err) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("guda evaluate: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    path = write_evaluation_recipe(root / "recipe.json")
    data = write_group_folder(root / "data", ["left", "middle", "right"])
    out = root / "out"
    code, stdout, stderr = run("evaluate", "--data", data, "--out", out, "--recipe", path, "--quiet")
    assert code == 0, stderr
    first_scores = {p.name: p.read_text() for p in sorted((out / "scores").glob("*.json"))}
    first_report = json.loads((out / "report.json").read_text())
    return {"root": root, "recipe": path, "data": data, "out": out, "stdout": stdout,
            "scores": first_scores, "report": first_report}


def test_report_layout(workspace):
    report = json.loads((workspace["out"] / "report.json").read_text())
    assert report["groups"] == ["left", "middle", "right"]
    assert report["group_sizes"] == [8, 8, 8]
    assert report["num_queries"] == 4
    assert report["seeds"]["logo_seed_a"] == 0 and report["seeds"]["logo_seed_b"] == 1
    assert report["recipe"]["train"]["steps"] == 10
    assert set(report["methods"]) == {"logo_seed_b", *METHODS}
    for method, metrics in report["methods"].items():
        for name in METRIC_NAMES:
            assert {"mean", "std"} <= set(metrics[name]), (method, name)
            assert np.isfinite(metrics[name]["mean"])
        assert "label_top1" not in metrics  # not the digits classes
    assert set(report["fraction_of_ceiling"]) == set(report["methods"])
    ceiling = report["fraction_of_ceiling"]["logo_seed_b"]
    assert all(v is None or v == pytest.approx(1.0) for v in ceiling.values())
    for stage in STAGES:
        c = report["cost"][stage]
        assert c["wall_s"] >= 0 and c["forwards"] >= 0 and c["backwards"] >= 0, stage
    # training: steps x batch per model; LOGO: one model per group
    assert report["cost"]["base"]["forwards"] == 10 * 8
    assert report["cost"]["logo_seed_a"]["forwards"] == 3 * 10 * 8
    assert report["cost"]["guda_unlearning"]["backwards"] == 3 * 2 * (4 + 4)
    # ELBO scoring: N x rows x (K + 1) models; stride 20 from t=10 on T=100 -> 5 rows
    assert report["cost"]["guda"]["forwards"] == 4 * 5 * 4
    assert report["cost"]["logo_seed_a_scoring"]["forwards"] == 4 * 5 * 4
    assert report["cost"]["similarity"]["forwards"] == 0
    assert report["cost_ratio_logo_over_guda"] > 0
    assert report["cost_ratio_logo_over_guda_passes"] == pytest.approx((2 * 240) / (48 + report["cost"]["guda_unlearning"]["forwards"]))


def test_artifacts(workspace):
    out = workspace["out"]
    md = (out / "report.md").read_text()
    assert "| guda |" in md and "±" in md and "Fraction of the ceiling" in md
    for name in ("metrics.png", "score_heatmaps.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert len(list((out / "queries").glob("*.png"))) == 4
    assert {p.stem for p in (out / "scores").glob("*.json")} == {"logo_seed_a", "logo_seed_b", *METHODS}
    assert "[1/10]" in workspace["stdout"] and "training the base model" in workspace["stdout"]


def test_the_methods_are_scored_before_logo_is_trained(workspace, tmp_path, monkeypatch):
    """Their scores are on disk before the long LOGO stages start (and `guda logo` runs elsewhere can train LOGO meanwhile)."""
    import guda_lab.evaluation.runner as runner

    lines = workspace["stdout"].splitlines()
    first_logo = next(i for i, line in enumerate(lines) if "LOGO models" in line)
    assert [line.split(" ")[3].rstrip(":") for line in lines[:first_logo] if " scores " in line] == list(METHODS)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_logo_models", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(tmp_path / "out", load_benchmark("digits-classes"), _micro_recipe(tmp_path), num_queries=2,
                       methods=["similarity", "guda"], progress=False, log=lambda *_: None)
    assert {p.stem for p in (tmp_path / "out" / "scores").glob("*.json")} == {"similarity", "guda"}
    assert not (tmp_path / "out" / "logo").exists()


def test_group_level_section(workspace):
    from guda_lab.evaluation.metrics import group_level_comparison

    report = workspace["report"]
    assert report["group_level"] is None  # a user's folder defines no comparisons
    scores = {p.stem: np.asarray(json.loads(p.read_text())["scores"]) for p in (workspace["out"] / "scores").glob("*.json")}
    comparison = GroupComparison("left-vs-right", "every query: left above right", np.arange(4), np.zeros(4, int), np.full(4, 2))
    methods = ["logo_seed_a", "logo_seed_b", *METHODS]
    level = group_level([comparison], scores, methods)
    entry = level["comparisons"]["left-vs-right"]
    assert entry["n"] == 4
    reference = entry["logo_seed_a"]
    assert reference == group_level_comparison(scores["logo_seed_a"][:, 0], scores["logo_seed_a"][:, 2])
    ref_order = np.sign(scores["logo_seed_a"][:4, 0] - scores["logo_seed_a"][:4, 2])
    for m in methods[1:]:
        pairwise = entry[m]["pairwise_agreement"]
        assert {k: v for k, v in entry[m].items() if k != "pairwise_agreement"} == group_level_comparison(scores[m][:, 0], scores[m][:, 2])
        assert pairwise == pytest.approx(np.mean(np.sign(scores[m][:4, 0] - scores[m][:4, 2]) == ref_order))
        assert level["pairwise_agreement"][m] == pairwise  # one comparison: its own share
        expected = None if reference["winner"] == "unresolved" else float((entry[m]["mean_diff"] > 0) == (reference["winner"] == "a"))
        assert level["agreement"][m] == expected
    md = format_markdown(dict(report, group_level=level))
    assert "## Group level" in md and "`left-vs-right` (4 queries)" in md
    table = md.split("## Group level")[1].split("## Cost")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "[" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| logo_seed_a", "| logo_seed_b", *(f"| {m}" for m in METHODS)]
    assert rows[0].endswith("| reference | reference |")
    assert rows[2].endswith(f" | {level['pairwise_agreement'][METHODS[0]]:.3f} |")


def test_rerun_reuses_everything(workspace):
    out = workspace["out"]
    code, stdout, stderr = run("evaluate", "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"], "--quiet")
    assert code == 0, stderr
    assert "base model: reusing" in stdout
    assert stdout.count("LOGO models") == 2 and stdout.count(": reusing") >= 4
    assert "adapters: reusing" in stdout and "queries: reusing" in stdout
    assert stdout.count("cached in") == 2 + len(METHODS)
    assert "training" not in stdout and "generating" not in stdout and "unlearning 3" not in stdout
    assert {p.name: p.read_text() for p in sorted((out / "scores").glob("*.json"))} == workspace["scores"]
    report = json.loads((out / "report.json").read_text())
    assert report["methods"] == workspace["report"]["methods"]
    assert all(report["cost"][s]["reused"] for s in report["cost"])
    assert report["cost_ratio_logo_over_guda"] == workspace["report"]["cost_ratio_logo_over_guda"]


def test_an_interrupted_unlearning_stage_resumes_and_counts_the_groups_it_finished(workspace, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(workspace["out"], out, ignore=shutil.ignore_patterns("bundle", "guda.json", "report.*"))
    recipe = Recipe.load(str(workspace["recipe"]))
    pipe = GUDADDPMPipeline.from_pretrained(out / "base")
    pipe.set_progress_bar_config(disable=True)
    dataset = GroupedDataset.from_image_folder(workspace["data"])
    pipe.unlearn_groups(dataset, recipe=recipe, groups=["middle"], checkpoint_dir=out / PARTIAL_BUNDLE, progress=False)
    # a recorded loop time no run could take here: the wall must include it, so it shows that it is counted
    stats_path = out / PARTIAL_BUNDLE / "middle" / STATS_NAME
    stats_path.write_text(json.dumps({**json.loads(stats_path.read_text()), "wall_s": 1e6}))
    code, _, stderr = run("evaluate", "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"], "--quiet")
    assert code == 0, stderr
    assert json.loads((out / "scores" / "guda.json").read_text())["scores"] == json.loads(workspace["scores"]["guda.json"])["scores"]
    report = json.loads((out / "report.json").read_text())
    cost, first = report["cost"]["guda_unlearning"], workspace["report"]["cost"]["guda_unlearning"]
    assert cost["resumed_groups"] == 1 and first["resumed_groups"] == 0
    assert cost["forwards"] == first["forwards"] and not cost["reused"]
    assert AdapterBundle.from_pretrained(out / "bundle").groups[1].stats["wall_s"] == 1e6  # reused, not trained again
    assert 1e6 < cost["wall_s"] < 1e6 + 600


def test_a_rerun_on_other_images_is_refused_and_changes_nothing(workspace, tmp_path):
    out = workspace["out"]
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    other_images = write_group_folder(tmp_path / "other", ["left", "middle", "right"], seed=1)
    line = assert_one_line_error(*run("evaluate", "--data", other_images, "--out", out, "--recipe", workspace["recipe"], "--quiet"))
    assert "other images or prompts" in line and "choose another --out" in line
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_methods_subset_reuses_scores(workspace, tmp_path):
    code, stdout, stderr = run("evaluate", "--data", workspace["data"], "--out", workspace["out"], "--recipe",
                               workspace["recipe"], "--methods", "similarity", "guda", "--quiet")
    assert code == 0, stderr
    report = json.loads((workspace["out"] / "report.json").read_text())
    assert set(report["methods"]) == {"logo_seed_b", "similarity", "guda"}
    assert report["methods"]["guda"] == workspace["report"]["methods"]["guda"]


def test_query_seed_gives_the_same_queries_and_scores_as_those_seeds_in_a_longer_run(workspace, tmp_path):
    """Queries from --query-seed 2 are queries 2 and 3 of the first run (seeds 2, 3), scored alike on the same models."""
    import shutil

    for stage in ("base", "logo", "bundle"):
        shutil.copytree(workspace["out"] / stage, tmp_path / "held-out" / stage)
    code, stdout, stderr = run("evaluate", "--data", workspace["data"], "--out", tmp_path / "held-out", "--recipe", workspace["recipe"],
                               "--queries", 2, "--query-seed", 2, "--methods", "guda", "similarity", "--quiet")
    assert code == 0, stderr
    assert "adapters: reusing" in stdout and "seeds 2..3" in stdout
    report = json.loads((tmp_path / "held-out" / "report.json").read_text())
    assert report["seeds"]["queries"] == 2 and json.loads((tmp_path / "held-out" / "queries.json").read_text())["seed"] == 2
    first = load_query_images(sorted((workspace["out"] / "queries").glob("*.png")))
    again = load_query_images(sorted((tmp_path / "held-out" / "queries").glob("*.png")))
    assert torch.equal(again, first[2:])
    for method in ("logo_seed_a", "guda"):
        scores = json.loads((tmp_path / "held-out" / "scores" / f"{method}.json").read_text())["scores"]
        assert scores == json.loads(workspace["scores"][f"{method}.json"])["scores"][2:], method


def test_paired_section_compares_guda_with_every_other_method(workspace):
    from guda_lab.evaluation.metrics import per_query_metrics

    report = workspace["report"]
    paired = report["paired"]
    assert paired["method"] == "guda" and paired["metrics"] == ["top1", "ndcg@3", "spearman"]
    assert set(paired["versus"]) == {"logo_seed_b", *METHODS} - {"guda"}
    scores = {name[:-5]: np.asarray(json.loads(text)["scores"]) for name, text in workspace["scores"].items()}
    d = per_query_metrics(scores["guda"], scores["logo_seed_a"])["spearman"] - per_query_metrics(scores["logo_seed_b"], scores["logo_seed_a"])["spearman"]
    entry = paired["versus"]["logo_seed_b"]["spearman"]
    assert entry["mean_diff"] == pytest.approx(d.mean()) and entry["stderr"] == pytest.approx(d.std(ddof=1) / 2) and entry["n"] == 4
    assert "guda − each method, paired" in (workspace["out"] / "report.md").read_text()


def test_unknown_method(workspace, tmp_path):
    line = assert_one_line_error(*run("evaluate", "--data", workspace["data"], "--out", tmp_path / "o",
                                      "--recipe", workspace["recipe"], "--methods", "nope", "--quiet"))
    assert "'nope'" in line and "instance_unlearning" in line


def test_unknown_benchmark(workspace, tmp_path):
    line = assert_one_line_error(*run("evaluate", "--benchmark", "nope", "--out", tmp_path / "o", "--recipe", workspace["recipe"]))
    assert "digits-classes" in line


def test_single_group_folder(workspace, tmp_path):
    data = write_group_folder(tmp_path / "one", ["only"])
    line = assert_one_line_error(*run("evaluate", "--data", data, "--out", tmp_path / "o", "--recipe", workspace["recipe"], "--quiet"))
    assert "at least 2" in line


def _micro_recipe(tmp_path):
    """The tiny recipe cut to a few steps, for runs on a whole benchmark dataset."""
    from diffusers_guda.recipes import Recipe

    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["train"].update(steps=3, batch_size=4, warmup_steps=1)
    recipe["unlearning"].update(steps=1, forget_batch_size=2, retain_batch_size=2, eval_images=2)
    recipe["elbo"] = {"stride": 50, "t_min": 10, "seed": 0}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return Recipe.load(path)


def test_digits_label_top1(tmp_path):
    """On the digits classes the report adds label_top1 (queries judged by guda_lab.queries.digit_classifier)."""
    lines = []
    report = run_evaluation(tmp_path / "out", load_benchmark("digits-classes"), _micro_recipe(tmp_path), num_queries=2,
                            methods=["similarity", "guda"], seed_b=5, progress=False, log=lines.append, benchmark="digits-classes")
    assert report["seeds"]["logo_seed_b"] == 5 and report["groups"] == [str(d) for d in range(10)]
    assert "label_top1" in report["metric_names"]
    for method in ("logo_seed_b", "similarity", "guda"):
        assert 0.0 <= report["methods"][method]["label_top1"]["mean"] <= 1.0
    assert sum(report["labels"]["counts"]) == 2
    assert report["cost"]["logo_seed_a"]["models"] == 10
    assert any("[10/10]" in line for line in lines)


def test_contributors_without_ceiling(tmp_path):
    """--no-ceiling skips LOGO seed B; digits-contributors adds its group-level comparisons."""
    benchmark = get_benchmark("digits-contributors")
    dataset = benchmark.load()
    report = run_evaluation(tmp_path / "out", dataset, _micro_recipe(tmp_path), num_queries=12, methods=["similarity", "guda"],
                            ceiling=False, progress=False, log=lambda line: None, benchmark=benchmark)
    assert report["ceiling"] is None and report["seeds"]["logo_seed_b"] is None and report["fraction_of_ceiling"] is None
    assert set(report["methods"]) == {"similarity", "guda"} and "logo_seed_b" not in report["cost"]
    assert not (tmp_path / "out" / "logo" / "seed_1").exists()
    queries = load_query_images(sorted((tmp_path / "out" / "queries").glob("*.png")))
    scores = {m: np.asarray(json.loads((tmp_path / "out" / "scores" / f"{m}.json").read_text())["scores"])
              for m in ("logo_seed_a", "similarity", "guda")}
    expected = group_level(benchmark.group_comparisons(dataset, queries), scores, list(scores))
    assert expected is not None and report["group_level"] == json.loads(json.dumps(expected))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "no ceiling" in md and "Fraction of the ceiling" not in md and "## Group level" in md


def test_baseline_options(workspace, tmp_path):
    line = assert_one_line_error(*run("evaluate", "--data", workspace["data"], "--out", tmp_path / "o", "--recipe",
                                      workspace["recipe"], "--gradient-option", "projection_dimension=8", "--quiet"))
    assert "projection_dimension" in line and "projection_dim" in line
    assert not (tmp_path / "o").exists()
    code, stdout, stderr = run("evaluate", "--data", workspace["data"], "--out", workspace["out"], "--recipe", workspace["recipe"],
                               "--methods", "gradient", "guda", "--gradient-option", "projection_dim=8", "--quiet")
    assert code == 0, stderr
    assert "gradient: 4 queries" in stdout and "guda: cached" in stdout  # only the changed baseline is recomputed
    report = json.loads((workspace["out"] / "report.json").read_text())
    assert report["baseline_settings"]["gradient"]["projection_dim"] == 8


def _synthetic_scores(num_queries: int, num_groups: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {m: rng.normal(size=(num_queries, num_groups)) for m in ("logo_seed_a", "logo_seed_b", "guda")}


def test_the_benchmark_decides_labels_and_comparisons(tmp_path):
    """The metrics stage asks the benchmark: the same digits get label_top1 only as the digits-classes benchmark."""
    dataset = load_benchmark("digits-classes")
    queries = dataset.images[[0, 1, 400, 900, 1500]]
    scores, methods = _synthetic_scores(5, 10), ["logo_seed_a", "logo_seed_b", "guda"]
    recipe = _micro_recipe(tmp_path)
    plain = Evaluation(tmp_path / "a", dataset, recipe, methods=["guda"], log=lambda line: None)
    sections = plain.compute_metrics(scores, methods, queries, None)
    assert sections["labels"] is None and "label_top1" not in sections["metric_names"] and sections["group_level"] is None
    classes = Evaluation(tmp_path / "b", dataset, recipe, methods=["guda"], log=lambda line: None, benchmark="digits-classes")
    sections = classes.compute_metrics(scores, methods, queries, None)
    assert "label_top1" in sections["metric_names"] and "label_top1" in sections["methods"]["guda"]
    # training images of the digits are labelled with their own digit by the 5-nearest-neighbour classifier
    expected = np.bincount(dataset.group_ids[[0, 1, 400, 900, 1500]].numpy(), minlength=10).tolist()
    assert sections["labels"]["counts"] == expected
    assert sections["group_level"] is None  # digits-classes declares no comparisons
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # stages write, the constructor does not


def test_the_runner_reports_the_comparisons_a_benchmark_declares(tmp_path):
    dataset = load_benchmark("digits-classes")
    every_query = GroupComparison("zero-vs-one", "every query: 0 above 1", np.arange(4), np.zeros(4, int), np.ones(4, int))
    mine = Benchmark("mine", lambda: dataset, "the digits with one comparison", comparisons=lambda ds, q: [every_query])
    evaluation = Evaluation(tmp_path / "o", dataset, _micro_recipe(tmp_path), methods=["guda"], log=lambda line: None, benchmark=mine)
    scores, methods = _synthetic_scores(4, 10), ["logo_seed_a", "logo_seed_b", "guda"]
    sections = evaluation.compute_metrics(scores, methods, dataset.images[:4], None)
    assert sections["group_level"] == group_level([every_query], scores, methods)
    assert list(sections["group_level"]["comparisons"]) == ["zero-vs-one"] and sections["labels"] is None


def test_unknown_benchmark_name_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match="digits-contributors"):
        Evaluation(tmp_path / "o", load_benchmark("digits-classes"), _micro_recipe(tmp_path), benchmark="nope")
    assert not (tmp_path / "o").exists()


def test_logo_subset_is_fixed_by_the_seed():
    assert logo_subset(10, None, 0) is None and logo_subset(10, 10, 0) is None
    subset = logo_subset(120, 12, 0)
    assert subset == logo_subset(120, 12, 0) == sorted(set(subset)) and len(subset) == 12 and 0 <= subset[0] and subset[-1] < 120
    assert logo_subset(120, 12, 1) != subset
    for size in (1, 121):
        with pytest.raises(ConfigError, match="between 2 and the 120 groups"):
            logo_subset(120, size, 0)


def test_logo_on_a_subset_compares_every_method_on_its_groups(workspace, tmp_path):
    """--logo-groups 2 of 3: LOGO is trained and scored for the subset only, every method is compared on
    those columns (the full run's scores restricted to them), and LOGO's cost is scaled to all groups."""
    import shutil

    out = tmp_path / "subset"
    for stage in ("base", "bundle", "queries", "logo"):  # the same models: nothing is trained again
        shutil.copytree(workspace["out"] / stage, out / stage)
    shutil.copy(workspace["out"] / "queries.json", out / "queries.json")
    code, stdout, stderr = run("evaluate", "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"],
                               "--logo-groups", "2", "--methods", "similarity", "guda", "--quiet")
    assert code == 0, stderr
    assert "training" not in stdout and "LOGO models, seed 0 (2 groups" in stdout
    subset = logo_subset(3, 2, 0)
    report = json.loads((out / "report.json").read_text())
    groups = [report["groups"][g] for g in subset]
    assert report["logo_groups"] == groups and report["logo_cost_scale"] == pytest.approx(1.5)
    full = {m: np.asarray(json.loads((workspace["out"] / "scores" / f"{m}.json").read_text())["scores"])
            for m in ("logo_seed_a", "logo_seed_b", "similarity", "guda")}
    for m in ("logo_seed_a", "logo_seed_b"):
        assert np.asarray(json.loads((out / "scores" / f"{m}.json").read_text())["scores"]) == pytest.approx(full[m][:, subset])
    from guda_lab.evaluation.metrics import summarize

    for m in ("logo_seed_b", "similarity", "guda"):
        expected = summarize(full[m][:, subset], full["logo_seed_a"][:, subset])
        assert report["methods"][m] == json.loads(json.dumps(expected)), m
    first = workspace["report"]
    assert report["cost"]["logo_seed_a"]["models"] == 2
    assert report["cost_ratio_logo_over_guda_passes"] == pytest.approx(first["cost_ratio_logo_over_guda_passes"])
    assert "LOGO was trained for 2 of the 3 groups" in (out / "report.md").read_text()
    from guda_lab.evaluation.results_table import run_table

    assert "against LOGO seed 0 on 2 of the 3 groups (LOGO trained for those only)" in run_table(report).splitlines()[0]


def test_logo_groups_outside_the_group_count_is_refused(workspace, tmp_path):
    for n in ("1", "4"):
        line = assert_one_line_error(*run("evaluate", "--data", workspace["data"], "--out", tmp_path / "o", "--recipe",
                                          workspace["recipe"], "--logo-groups", n, "--quiet"))
        assert "between 2 and the 3 groups" in line
    line = assert_one_line_error(*run("evaluate", "--data", workspace["data"], "--out", tmp_path / "o", "--recipe",
                                      workspace["recipe"], "--logo-groups", "0", "--quiet"))
    assert "--logo-groups must be >= 1" in line
    assert not (tmp_path / "o").exists()


def test_reference_draws_rescore_logo_alone(workspace, tmp_path):
    """--reference-draws 3: both LOGO sets are scored again with 3 draws per timestep (their scores are the
    estimator's with those settings, their scoring passes tripled); the other methods' scores are reused."""
    import shutil
    from dataclasses import replace

    from diffusers import DDPMScheduler, UNet2DModel

    from diffusers_guda.recipes import Recipe
    from guda_lab.evaluation.logo import logo_attribution

    out = tmp_path / "draws"
    shutil.copytree(workspace["out"], out)
    kept = {m: (out / "scores" / f"{m}.json").read_text() for m in ("guda", "similarity")}
    code, stdout, stderr = run("evaluate", "--data", workspace["data"], "--out", out, "--recipe", workspace["recipe"],
                               "--reference-draws", "3", "--methods", "guda", "similarity", "--quiet")
    assert code == 0, stderr
    assert stdout.count("cached in") == 2 and "logo_seed_a: cached" not in stdout
    first, report = workspace["report"], json.loads((out / "report.json").read_text())
    elbo = replace(Recipe.load(workspace["recipe"]).elbo, num_draws=3)
    assert report["reference_elbo"] == elbo.to_dict() and first["reference_elbo"]["num_draws"] == 1
    for name, seed in (("logo_seed_a", 0), ("logo_seed_b", 1)):
        assert report["cost"][f"{name}_scoring"]["forwards"] == 3 * first["cost"][f"{name}_scoring"]["forwards"]
        saved = json.loads((out / "scores" / f"{name}.json").read_text())
        assert saved["key"]["settings"]["elbo"]["num_draws"] == 3
        logo = {g: UNet2DModel.from_pretrained(out / "logo" / f"seed_{seed}" / g, subfolder="unet") for g in report["groups"]}
        expected = logo_attribution(UNet2DModel.from_pretrained(out / "base", subfolder="unet"), logo,
                                    DDPMScheduler.from_pretrained(out / "base", subfolder="scheduler"),
                                    load_query_images(sorted((out / "queries").glob("*.png"))), elbo, progress=False)
        np.testing.assert_allclose(saved["scores"], expected.scores.double().numpy(), rtol=0, atol=1e-9)
    assert {m: (out / "scores" / f"{m}.json").read_text() for m in kept} == kept
    assert "LOGO's scores use 3 noise draws per timestep" in (out / "report.md").read_text()
    assert "noise draws" not in format_markdown(first)
    from guda_lab.evaluation.results_table import run_table

    assert run_table(report).splitlines()[0].endswith("LOGO scored with 3 draws per timestep")
    line = assert_one_line_error(*run("evaluate", "--data", workspace["data"], "--out", tmp_path / "o", "--recipe",
                                      workspace["recipe"], "--reference-draws", "0", "--quiet"))
    assert "--reference-draws must be >= 1" in line


def test_reference_draws_must_be_a_positive_integer(tmp_path):
    data = write_group_folder(tmp_path / "data", ["left", "right"])
    from diffusers_guda.data import GroupedDataset

    for bad in (0, 2.0, True):
        with pytest.raises(ConfigError, match="reference_draws must be a positive integer"):
            Evaluation(tmp_path / "out", GroupedDataset.from_image_folder(data), write_evaluation_recipe(tmp_path / "r.json"),
                       reference_draws=bad)
    assert not (tmp_path / "out").exists()
