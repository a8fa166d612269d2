"""examples/sd15_style_attribution.py runs end to end offline with --tiny."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sd15_style_attribution.py"

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_sd15_example_tiny_run(tmp_path):
    spec = importlib.util.spec_from_file_location("sd15_style_attribution", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--tiny", "--out", str(tmp_path), "--images-per-prompt", "1"])
    assert report["groups"] == ["blue", "green", "red"] and len(report["scores"]) == 2
    assert json.loads((tmp_path / "attribution.json").read_text())["top_group"] == report["top_group"]
    assert (tmp_path / "attribution.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "bundle" / "guda_bundle.json").is_file()
