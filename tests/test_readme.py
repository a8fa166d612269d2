"""The README's Stable Diffusion walkthrough runs as written on the tiny offline pipeline.

Only what cannot run here is replaced (each replacement must still match the README, so the test
fails when the README changes under it): the Hub ids become the tiny model and a local bundle, the
GPU lines run on the CPU in float32, the step counts shrink, and the Hub upload is left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_sd_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Your own Stable Diffusion or SDXL model, step by step"

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def walkthrough_code(replacements: dict[str, str]) -> str:
    text = README.read_text()
    section = text[text.index(SECTION) + len(SECTION) :]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section[: section.index("\n## ")], flags=re.S))
    for old, new in replacements.items():
        assert old in code, f"the README's walkthrough no longer contains {old!r}"
        code = code.replace(old, new)
    return code


def write_styles_folder(root: Path) -> None:
    """The walkthrough's `styles/` folder: the tiny colour styles as PNGs with metadata.jsonl and groups.json."""
    data = make_sd_dataset()
    root.mkdir()
    rows = []
    for i, (image, group, prompt) in enumerate(zip(data.images, data.group_ids.tolist(), data.prompts)):
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "text": prompt, "group": data.group_names[group]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "groups.json").write_text(json.dumps({name: [name] for name in data.group_names}))


def test_readme_stable_diffusion_walkthrough_runs(tmp_path, monkeypatch, tiny_sd_dir):
    monkeypatch.chdir(tmp_path)
    write_styles_folder(tmp_path / "styles")
    code = walkthrough_code({
        '"you/sd15-finetune", torch_dtype=torch.float16).to("cuda")': f'{str(tiny_sd_dir)!r}, torch_dtype=torch.float32)',
        "pipe.unlearn_groups(dataset)": "pipe.unlearn_groups(dataset, steps=10, learning_rate=2e-3)",
        'recipe="sd-styles", steps=200)': 'recipe="sd-styles", steps=10, learning_rate=2e-3)',
        'bundle.push_to_hub("you/styles-bundle")': "",
        'num_inference_steps=30': "num_inference_steps=2",
        'pipe.load_guda_bundle("you/styles-bundle")': 'pipe.load_guda_bundle("styles-bundle")',
        'resolution=512)': "resolution=16)",
        "result = pipe.attribute(images,": "result = pipe.attribute(dataset.load().images[[0, 6]],",
    })
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    bundle, out, result, dataset = namespace["bundle"], namespace["out"], namespace["result"], namespace["dataset"]

    assert bundle.group_names == ["blue", "green", "red"] and bundle.objective["name"] == "anchor"
    assert bundle.training["steps"] == 10 and bundle.elbo == namespace["pipe"].guda_bundle.elbo
    assert (tmp_path / "styles-bundle" / "guda_bundle.json").is_file() and (tmp_path / "attribution.json").is_file()
    assert out.attribution.scores.shape == (1, 3) and result.scores.shape == (2, 3)
    assert result.metadata["prompts"] == ["a lighthouse at dusk", "a cat on a sofa"]
    assert result.metadata["elbo"] == bundle.elbo

    assert torch.isfinite(result.scores).all() and (result.scores != 0).all() and (result.stderr > 0).all()

    # the bundle saved in step 4 and loaded back in step 5 scores exactly as the one unlearned in step 3
    pipe = namespace["pipe"]
    in_memory = pipe.attribute(dataset.load().images[[0, 6]], prompts=result.metadata["prompts"], bundle=bundle, progress=False)
    assert torch.equal(in_memory.scores, result.scores) and torch.equal(in_memory.stderr, result.stderr)
