"""The lazy-data memory benchmark's smoke run: every image is VAE-encoded once, for all groups and runs."""

from __future__ import annotations

import json

from conftest import load_benchmark_script


def test_small_run_encodes_each_image_once_and_reports_memory(tmp_path, capsys):
    module = load_benchmark_script("lazy_data_memory")
    saved = tmp_path / "memory.json"
    module.main(["--small", "--threads", "1", "--out", str(saved), "--workdir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    result = json.loads(saved.read_text())
    cases = {(c["case"], c["images"]): c for c in result["cases"]}
    assert set(cases) == {(case, n) for case in ("unlearn", "rerun", "attribute") for n in (32, 128)} | {("eager", 32)}
    for n in (32, 128):
        assert cases["unlearn", n]["vae_forwards_first_call"] == n and cases["unlearn", n]["vae_forwards_second_call"] == 0
        assert cases["rerun", n]["vae_forwards_first_call"] == 0 and cases["rerun", n]["vae_forwards_second_call"] == 0
        assert len(cases["attribute", n]["top_groups"]) == 4
    assert cases["eager", 32]["vae_forwards"] == 32 and cases["eager", 32]["pixel_bytes_held"] == 32 * 3 * 64 * 64 * 4
    assert "peak RSS above baseline" in printed
