"""The README's Stable Diffusion section runs as written on the tiny offline pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def sd_section_code() -> str:
    text = README.read_text()
    section = text[text.index("## Stable Diffusion") :]
    section = section[: section.index("\n## ", 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_stable_diffusion_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(sd_section_code(), "README.md", "exec"), namespace)
    result, out, bundle = namespace["result"], namespace["out"], namespace["bundle"]
    assert bundle.group_names == ["blue", "red"] and bundle.objective["name"] == "anchor"
    assert (tmp_path / "styles-bundle" / "guda_bundle.json").is_file()
    assert out.attribution.scores.shape == (1, 2)
    assert result.scores.shape == (1, 2) and result.metadata["prompts"] == ["a square in red style"]
    assert "red" in capsys.readouterr().out
