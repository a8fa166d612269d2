"""The base-capacity probe: each variant's contact sheet and record are written as it finishes."""

from __future__ import annotations

import json

import torch
from PIL import Image

from conftest import load_benchmark_script
from guda_lab.evaluation.benchmarks import get_benchmark
from guda_lab.queries import query_prompts


def test_tiny_variants_write_their_sheets_and_records(tmp_path):
    module = load_benchmark_script("base_capacity")
    module.main(["--benchmark", "digits-classes", "--tiny", "--variants", "recipe", "wide-ema", "epsilon", "--samples", "10",
                 "--out", str(tmp_path)])
    record = json.loads((tmp_path / "capacity.json").read_text())
    assert list(record["variants"]) == ["recipe", "wide-ema", "epsilon"] and record["images"] == 1797
    recipe, wide = record["variants"]["recipe"], record["variants"]["wide-ema"]
    assert wide["attention"] and not recipe["attention"] and wide["ema_decay"] == 0.9995
    assert record["variants"]["epsilon"]["prediction_type"] == "epsilon" == recipe["prediction_type"]  # the digits recipe's
    assert wide["parameters"] > recipe["parameters"] and recipe["steps"] == 3
    # 3 training steps make noise, far from every digit; real digits lie much nearer each other
    assert recipe["sample_nearest_training_rms"] > 2 * record["training_nearest_other_rms"] > 0
    sheet = Image.open(tmp_path / "recipe.png")
    assert sheet.size == (8 * 8 * 4, 2 * 8 * 4)  # 10 samples of 8 x 8, eight to a row, shown 4x
    assert sheet.getpixel((sheet.width - 1, sheet.height - 1)) == (255, 255, 255)  # the short last row is padded white


def test_nearest_distances_are_rms_pixel_distances():
    module = load_benchmark_script("base_capacity")
    images = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]], [[[1.0, -1.0]]]])
    assert module.nearest_distances(images, images).tolist() == [0.0, 0.0, 0.0]
    # image 1's nearest other image is image 0 (rms 1), image 2's is image 0 too (rms 1), image 0's is at rms 1
    assert module.nearest_distances(images, images, itself=torch.tensor([0, 1, 2])).tolist() == [1.0, 1.0, 1.0]
    assert module.nearest_distances(images[1:], images, itself=torch.tensor([1, 2])).tolist() == [1.0, 1.0]


def test_a_text_conditioned_benchmark_samples_the_query_prompts(tmp_path):
    module = load_benchmark_script("base_capacity")
    module.main(["--benchmark", "digits-styles", "--tiny", "--variants", "v-prediction", "--samples", "3", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "capacity.json").read_text())
    assert record["prompts"] == query_prompts(get_benchmark("digits-styles").load(), 3) and len(set(record["prompts"])) == 3
    variant = record["variants"]["v-prediction"]
    assert variant["prediction_type"] == "v_prediction" and variant["parameters"] > 0
    assert Image.open(tmp_path / "v-prediction.png").size == (3 * 8 * 4, 8 * 4)
