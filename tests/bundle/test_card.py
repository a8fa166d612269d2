"""Tests of diffusers_guda.bundle.card: the bundle's model card."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from bundle_helpers import TAGS, make_source

pytest_plugins = ["bundle_helpers"]  # its fixtures

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


def test_model_card(source, saved, tmp_path):
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "diffusers"
    assert TAGS <= set(card.data.tags)
    assert card.data.base_model == "tiny/unet"
    text = card.text
    assert "unlearned" in text and "ELBO(x; base) - ELBO(x; base + adapter_k)" in text
    assert "| 1 | Dogs/Wolves | `dogs-wolves` | 11 | 0.1 → 1.3 | 0.09 → 0.095 |" in text
    assert 'prefix="unet"' in text and "AdapterBundle.from_pretrained" in text and "load_guda_bundle" in text

    _, _, anonymous = make_source(["p|q"], base_id=None)
    card = ModelCard.load(anonymous.save_pretrained(tmp_path / "anon") / "README.md")
    assert card.data.base_model is None and card.data.library_name == "diffusers"
    assert "p\\|q" in card.text


def test_card_names_the_repo_and_the_base_details(source):
    bundle = source[2]
    text = bundle.model_card("someone/my-bundle").text
    assert 'AdapterBundle.from_pretrained("someone/my-bundle")' in text
    assert "Base model: `tiny/unet`, dtype `float32`, class_name `GUDAUNet2DModel`" in text
    assert bundle.base_model["fingerprint"] in text
    assert "LoRA: rank 4, alpha 4, on " in text and "Objective: `retrack`" in text
    assert "path/or/repo-id-of-this-bundle" in bundle.model_card().text  # nowhere to point to yet
    assert "text-to-image" not in text  # no conditional note for an unconditional base


def test_card_of_a_text_to_image_bundle():
    _, _, bundle = make_source(["red"], base_id="org/sd", base_extra={"conditional": True, "latent": True})
    text = bundle.model_card("org/bundle").text
    assert 'pipe.load_lora_weights("org/bundle", weight_name="adapters/red/pytorch_lora_weights.safetensors"' in text
    assert "conditional ELBOs of the image's VAE latent" in text and "prompts=..." in text


def test_card_without_statistics_shows_dashes():
    _, _, bundle = make_source(["g"])
    bundle.groups[0].stats = {"forget_loss_after": 0.5}
    assert "| 0 | g | `g` | 10 | – → 0.5 | – |" in bundle.model_card().text
