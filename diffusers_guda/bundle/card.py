"""The bundle's model card (``README.md``): what the adapters are, the groups, and how to load them
with diffusers-guda or stock diffusers (see docs/formats.md#model-card)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from huggingface_hub import ModelCard, ModelCardData

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
    return f"""
# GUDA adapter bundle ({bundle.num_groups} groups)

Group data attribution by unlearning, made with diffusers-guda for the base UNet {base_desc}.

Each of the {bundle.num_groups} LoRA adapters in `adapters/<slug>/` is **the base model with one group of
its training data unlearned**. The attribution score of group *k* for an image *x* is

    score_k(x) = ELBO(x; base) - ELBO(x; base + adapter_k)

and a higher score means group *k* mattered more for *x*.

- Base model: {", ".join([base_desc, *details])}; UNet weight fingerprint (sha256)
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
names = bundle.load_into(pipe.unet)   # refuses a UNet with other base weights
pipe.unet.set_adapter(names[0])       # the base model with group {first.name!r} unlearned
# or, with a GUDA pipeline: pipe.load_guda_bundle("{ref}")
```

Every adapter is a stock diffusers LoRA file, readable without diffusers-guda:

```python
{_stock_loading(bundle, ref, first)}
```
{_conditional_note(bundle.base_model)}"""


def _groups_table(groups: list[GroupRecord]) -> str:
    rows = []
    for g in groups:
        cells = [str(g.id), _md(g.name), f"`{g.slug}`", str(g.num_images)]
        cells += [_before_after(g.stats, key) for key, _ in STAT_COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    header = "| id | group | slug | images | " + " | ".join(f"{t} (before → after)" for _, t in STAT_COLUMNS)
    header += " |"
    return f"{header}\n|{'---|' * (4 + len(STAT_COLUMNS))}\n" + "\n".join(rows)


def _stock_loading(bundle: AdapterBundle, ref: str, first: GroupRecord) -> str:
    name = bundle.adapter_name(first.slug)
    if bundle.base_model.get("latent") or bundle.base_model.get("conditional"):
        return (
            f'pipe.load_lora_weights("{ref}", weight_name="{first.adapter_file}", adapter_name="{name}")\n'
            f"# or: pipe.unet.load_lora_adapter(\"{ref}\", weight_name=\"{first.adapter_file}\", prefix=\"unet\")"
        )
    return (
        f'pipe.unet.load_lora_adapter(\n    "{ref}",\n    weight_name="{first.adapter_file}",\n'
        f'    prefix="unet",\n    adapter_name="{name}",\n)'
    )


def _conditional_note(base: dict) -> str:
    if not base.get("conditional"):
        return ""
    latent = " of the image's VAE latent (posterior mean x scaling factor)" if base.get("latent") else ""
    return (
        f"\nThe base is a text-to-image model: scores are conditional ELBOs{latent} given the image's "
        "prompt, so attribute each image with the prompt it was generated from "
        "(`pipe.attribute(images, prompts=...)` with `GUDAStableDiffusionPipeline`).\n"
    )


def _md(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _before_after(stats: dict, key: str) -> str:
    before, after = stats.get(f"{key}_loss_before"), stats.get(f"{key}_loss_after")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "–"  # noqa: E731
    return "–" if before is None and after is None else f"{fmt(before)} → {fmt(after)}"
