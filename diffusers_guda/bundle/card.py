"""The bundle's model card (``README.md``): what the adapters are, the groups, and how to load them
with diffusers-guda or stock diffusers (see docs/formats.md#model-card)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

from ..lora import lora_prefix
from .hub import looks_like_hub_id

if TYPE_CHECKING:
    from .adapter_bundle import AdapterBundle
    from .manifest import GroupRecord

CARD_TAGS = ["data-attribution", "machine-unlearning", "guda", "lora"]
# (stats key prefix, column title) of the groups table: "<prefix>_loss_before" -> "<prefix>_loss_after"
STAT_COLUMNS = (("forget", "forget loss"), ("retain", "retain loss"))


def model_card(bundle: AdapterBundle, repo_id: str | None = None) -> ModelCard:
    """The model card of ``bundle``.

    Args:
        bundle: The bundle.
        repo_id: The Hub repo or directory the bundle will live in, used in the usage snippets
            (default: where it was loaded from, else a placeholder).

    Returns:
        The card, with ``base_model`` metadata when the base model's id is a Hub repo id.
    """
    base_id = bundle.base_model.get("id")
    data = ModelCardData(
        base_model=base_id if looks_like_hub_id(base_id) else None, library_name="diffusers", tags=list(CARD_TAGS)
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_body(bundle, repo_id)}")


def _body(bundle: AdapterBundle, repo_id: str | None) -> str:
    ref = repo_id or (bundle.source or {}).get("repo_id") or "path/or/repo-id-of-this-bundle"
    base = bundle.base_model
    base_desc = f"`{base['id']}`" if base.get("id") else "an unnamed base model"
    details = [f"{k} `{base[k]}`" for k in ("revision", "dtype", "class_name") if base.get(k) is not None]
    targets = ", ".join(map(str, bundle.lora.get("target_modules", [])))
    lora_desc = f"rank {bundle.lora.get('rank')}, alpha {bundle.lora.get('alpha')}, on {targets}"
    first = bundle.groups[0]
    component = lora_prefix(base.get("class_name") or "")  # "unet" or "transformer": where the adapters go
    return f"""
# GUDA adapter bundle ({bundle.num_groups} groups)

Group data attribution by unlearning, made with diffusers-guda for the base {_component_title(component)} {base_desc}.

Each of the {bundle.num_groups} LoRA adapters in `adapters/<slug>/` is **the base model with one group of
its training data unlearned**. The attribution score of group *k* for an image *x* is

    score_k(x) = ELBO(x; base) - ELBO(x; base + adapter_k)

and a higher score means group *k* mattered more for *x*.

- Base model: {", ".join([base_desc, *details])}; {_component_title(component)} weight fingerprint (sha256)
  `{base['fingerprint']}`. The adapters only mean something on exactly these weights, and
  loading checks the fingerprint.
- Objective: `{bundle.objective.get('name')}`. LoRA: {lora_desc}.
- Everything else (objective settings, ELBO settings, seeds, statistics) is in `guda_bundle.json`.

## Groups

{_groups_table(bundle.groups)}

## Usage

```python
from diffusers_guda.bundle import AdapterBundle

bundle = AdapterBundle.from_pretrained("{ref}")
names = bundle.load_into(pipe.{component})   # refuses a {_component_title(component)} with other base weights
pipe.{component}.set_adapter(names[0])       # the base model with group {first.name!r} unlearned
# or, with a GUDA pipeline: pipe.load_guda_bundle("{ref}")
```

Every adapter is a stock diffusers LoRA file, readable without diffusers-guda:

```python
{_stock_loading(bundle, ref, first, component)}
```
{_conditional_note(bundle.base_model)}{_guidance_note(bundle.base_model)}"""


def _groups_table(groups: list[GroupRecord]) -> str:
    rows = []
    for g in groups:
        cells = [str(g.id), _md(g.name), f"`{g.slug}`", str(g.num_images)]
        cells += [_before_after(g.stats, key) for key, _ in STAT_COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    header = "| id | group | slug | images | " + " | ".join(f"{t} (before → after)" for _, t in STAT_COLUMNS)
    header += " |"
    return f"{header}\n|{'---|' * (4 + len(STAT_COLUMNS))}\n" + "\n".join(rows)


def _component_title(component: str) -> str:
    return "UNet" if component == "unet" else component


def _stock_loading(bundle: AdapterBundle, ref: str, first: GroupRecord, prefix: str) -> str:
    name = bundle.adapter_name(first.slug)
    if bundle.base_model.get("latent") or bundle.base_model.get("conditional"):
        return (
            f'pipe.load_lora_weights("{ref}", weight_name="{first.adapter_file}", adapter_name="{name}")\n'
            f"# or: pipe.{prefix}.load_lora_adapter(\"{ref}\", weight_name=\"{first.adapter_file}\", prefix=\"{prefix}\")"
        )
    return (
        f'pipe.{prefix}.load_lora_adapter(\n    "{ref}",\n    weight_name="{first.adapter_file}",\n'
        f'    prefix="{prefix}",\n    adapter_name="{name}",\n)'
    )


def _guidance_note(base: dict) -> str:
    if base.get("guidance") is None:
        return ""
    return (
        f"\nThe base is a guidance-distilled Flux transformer: the adapters were unlearned, and are scored, with embedded "
        f"guidance {base['guidance']} (`base_model.guidance` in `guda_bundle.json`); `load_guda_bundle` uses it.\n"
    )


def _conditional_note(base: dict) -> str:
    if not base.get("conditional"):
        return ""
    scaled = "(posterior mean - shift) x scaling factor" if base.get("vae_shift_factor") is not None else "posterior mean x scaling factor"
    latent = f" of the image's VAE latent ({scaled})" if base.get("latent") else ""
    return (
        f"\nThe base is a text-to-image model: scores are conditional ELBOs{latent} given the image's "
        "prompt, so attribute each image with the prompt it was generated from "
        f"(`pipe.attribute(images, prompts=...)` with `{_guda_pipeline(base)}`).\n"
    )


def _guda_pipeline(base: dict) -> str:
    """The GUDA pipeline class of the bundle's base model family (``GUDAStableDiffusionPipeline`` for a bundle without one)."""
    from ..pipelines.auto import family_pipeline  # the pipelines import bundles: imported when a card is written

    return family_pipeline(base["family"]) if base.get("family") else "GUDAStableDiffusionPipeline"


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _before_after(stats: dict, key: str) -> str:
    before, after = stats.get(f"{key}_loss_before"), stats.get(f"{key}_loss_after")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    return "–" if before is None and after is None else f"{fmt(before)} → {fmt(after)}"
