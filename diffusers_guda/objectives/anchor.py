"""Anchor redirection for text-to-image models (GUDA-C, docs/method.md#objectives).

On a noisy forget latent ``z_t`` (the forget image's latent with its own noise and timestep), the
student conditioned on the forget prompt ``c_f`` is trained to predict what the frozen teacher
predicts for the *same* ``z_t`` and ``t`` under an **anchor prompt** ``c_a``: the same content in
another group's style. So the group's style is redirected to plausible other styles instead of being
pushed toward noise. The preserve term distils the teacher on retain samples.

Anchor prompts:

* ``awss`` (default, adaptive weighted style selection): an anchor group ``s`` is drawn from
  ``π(s) = (1 − η) softmax_s(β cos(e_f, p_s)) + η uniform(s ≠ k)`` over the other groups, where
  ``e_f`` is the forget prompt's text embedding and ``p_s`` group ``s``'s prototype (the normalised
  mean of the normalised embeddings of its descriptors, or of its prompts when it has none); then
  ``num_descriptors`` of ``s``'s descriptors replace the forget group's in the prompt.
* ``uniform``: the same, with ``s`` uniform over the other groups.
* ``style_removed``: the forget prompt with the forget group's descriptors removed.

A group's descriptors are its phrases in ``groups.json`` (``GroupedDataset.group_descriptors``), or
its name when it has none. Text embeddings for the similarities are the pipeline's own: the pooled
text embedding where the UNet takes one (SDXL), else the conditioning embeddings averaged over token
positions. Anchor prompts are encoded the same way; each forget image keeps its own SDXL time ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..diffusion import NoiseSchedule
from ..errors import ConfigError, DataError
from ..models import conditioning_dict
from .base import ObjectiveConfig, UnlearningBatch, UnlearningObjective, register_objective

STRATEGIES = ("awss", "uniform", "style_removed")


@dataclass
class AnchorConfig(ObjectiveConfig):
    strategy: str = field(default="awss", metadata={"help": "'awss', 'uniform' or 'style_removed'."})
    beta: float = field(default=2.0, metadata={"help": "β, inverse temperature of the similarity softmax (AWSS)."})
    eta: float = field(default=0.3, metadata={"help": "η, weight of the uniform mixture over the other groups (AWSS)."})
    num_descriptors: int = field(default=3, metadata={"help": "Descriptors of the anchor group put into the anchor prompt."})
    prototype_prompts: int = field(default=16, metadata={"help": "Prompts averaged into a prototype for a group without descriptors."})
    preserve: str = field(default="distill", metadata={"help": "'distill' (match the teacher, default) or 'mse'."})

    def __post_init__(self):
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"anchor strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must lie in [0, 1], got {self.eta}.")
        if self.num_descriptors < 1 or self.prototype_prompts < 1:
            raise ConfigError("num_descriptors and prototype_prompts must be >= 1.")


def _pattern(phrases: list[str]) -> re.Pattern:
    ordered = sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True)  # longest first
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in ordered) + r")(?!\w)", re.IGNORECASE)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text))
    text = re.sub(r"(,\s*){2,}", ", ", text)
    return text.strip(" ,")


def strip_phrases(prompt: str, phrases: list[str]) -> str:
    """``prompt`` without any of ``phrases`` (whole words, case-insensitive), tidied."""
    return _tidy(_pattern(phrases).sub("", prompt))


def replace_phrases(prompt: str, phrases: list[str], replacement: str) -> str:
    """Put ``replacement`` where the first of ``phrases`` occurs and drop the others; append it if none occurs."""
    pattern = _pattern(phrases)
    match = pattern.search(prompt)
    if match is None:
        return _tidy(f"{prompt}, {replacement}")
    rest = pattern.sub("", prompt[match.end():])
    return _tidy(prompt[: match.start()] + replacement + rest)


def group_descriptors(dataset, group: int) -> list[str]:
    """The group's descriptors (``groups.json``), or its name when it has none."""
    name = dataset.group_names[group]
    return list((dataset.group_descriptors or {}).get(name) or [name])


def anchor_distribution(similarities: torch.Tensor, forget_group: int, beta: float, eta: float, uniform: bool = False) -> torch.Tensor:
    """``π(s) = (1 − η) softmax(β sim)_s + η / (K − 1)`` over ``s ≠ k`` (``π(k) = 0``), in float64.

    Args:
        similarities: ``[B, K]`` cosine similarities of each forget prompt to each group's prototype.
        forget_group: ``k``.
        beta: Inverse temperature.
        eta: Uniform mixing weight.
        uniform: Ignore the similarities (uniform over ``s ≠ k``).

    Returns:
        ``[B, K]`` probabilities, each row summing to 1.
    """
    b, k = similarities.shape
    if k < 2:
        raise ConfigError("Anchoring needs at least one other group.")
    others = torch.ones(k, dtype=torch.bool)
    others[forget_group] = False
    flat = others.to(torch.float64) / (k - 1)
    if uniform:
        return flat.expand(b, k).clone()
    logits = (beta * similarities.to(torch.float64)).masked_fill(~others, float("-inf"))
    return (1.0 - eta) * torch.softmax(logits, dim=1) + eta * flat


@register_objective
class Anchor(UnlearningObjective):
    """Redirect the forget group's prompts to anchor prompts of other groups (GUDA-C); preserve by distillation."""

    name = "anchor"
    config_class = AnchorConfig
    needs_text = True

    def __init__(self, config: AnchorConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self._dataset = None
        self._group: int | None = None
        self._prototypes: torch.Tensor | None = None

    def setup(self, dataset, group: int, schedule: NoiseSchedule) -> None:
        if dataset.prompts is None:
            raise DataError("The anchor objective is for text-to-image models: the dataset needs one prompt per image.")
        self._dataset, self._group, self._prototypes = dataset, group, None

    def teacher_passes(self, forget_batch_size: int, retain_batch_size: int) -> int:
        return forget_batch_size + super().teacher_passes(forget_batch_size, retain_batch_size)

    # -- anchor prompts -------------------------------------------------------------------------

    @staticmethod
    def _embed(encode, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``: the pooled embedding (SDXL's ``text_embeds``, SD3's and
        Flux's ``pooled_projections``), else the token mean."""
        cond = conditioning_dict(encode(prompts))
        pooled = cond.get("text_embeds", cond.get("pooled_projections"))
        vectors = pooled.to(torch.float32) if pooled is not None else cond["encoder_hidden_states"].to(torch.float32).mean(dim=1)
        return torch.nn.functional.normalize(vectors, dim=-1)

    def prototypes(self, encode) -> torch.Tensor:
        """``[K, D]`` normalised group prototypes (descriptors, else up to ``prototype_prompts`` prompts)."""
        if self._prototypes is None:
            data, rows = self._dataset, []
            for g, name in enumerate(data.group_names):
                phrases = (data.group_descriptors or {}).get(name)
                if not phrases:
                    seen = []
                    for i in data.forget_indices(g).tolist():
                        if data.prompts[i] not in seen:
                            seen.append(data.prompts[i])
                        if len(seen) == self.config.prototype_prompts:
                            break
                    phrases = seen
                rows.append(torch.nn.functional.normalize(self._embed(encode, phrases).mean(0), dim=-1))
            self._prototypes = torch.stack(rows)
        return self._prototypes

    def anchor_prompts(self, prompts: list[str], encode, generator: torch.Generator) -> list[str]:
        """One anchor prompt per forget prompt (see the module docstring)."""
        cfg, data, k = self.config, self._dataset, self._group
        forget_phrases = group_descriptors(data, k)
        if cfg.strategy == "style_removed":
            return [strip_phrases(p, forget_phrases) for p in prompts]
        if cfg.strategy == "uniform":
            probs = anchor_distribution(torch.zeros(len(prompts), data.num_groups), k, cfg.beta, cfg.eta, uniform=True)
        else:
            sims = self._embed(encode, prompts) @ self.prototypes(encode).T
            probs = anchor_distribution(sims, k, cfg.beta, cfg.eta)
        groups = torch.multinomial(probs.to(torch.float32), 1, generator=generator).squeeze(1).tolist()
        out = []
        for prompt, s in zip(prompts, groups):
            phrases = group_descriptors(data, s)
            m = min(cfg.num_descriptors, len(phrases))
            chosen = [phrases[i] for i in torch.randperm(len(phrases), generator=generator)[:m].tolist()]
            out.append(replace_phrases(prompt, forget_phrases, ", ".join(chosen)))
        return out

    # -- loss -----------------------------------------------------------------------------------

    def forget_loss(self, batch: UnlearningBatch) -> torch.Tensor:
        if batch.encode_prompts is None or batch.forget_prompts is None or batch.forget_cond is None:
            raise ConfigError("The anchor objective needs a text-conditioned UNet and prompts (use it through pipe.unlearn_groups).")
        anchors = self.anchor_prompts(batch.forget_prompts, batch.encode_prompts, batch.generator)
        anchor_cond = batch.prompt_cond(anchors, batch.forget_cond)
        x_t = batch.noisy("forget")
        target = batch.teach(x_t, batch.forget_t, anchor_cond).float()
        output = batch.predict(x_t, batch.forget_t, batch.forget_cond).float()
        return torch.nn.functional.mse_loss(output, target)
