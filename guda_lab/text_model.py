"""Recipe of a small text-conditioned pixel-space model, trained by :func:`~diffusers_guda.training.train_base_model`.

The model is a ``UNet2DConditionModel`` on the images themselves (no VAE) with cross-attention on the
last hidden state of a tiny ``CLIPTextModel``. The text encoder is randomly initialised from its own
seed (``text_seed``) and frozen, so the full model and every leave-one-group-out model share exactly
the same text encoder and tokenizer whatever their training seed: only the UNet is trained. A random
frozen encoder is enough here because the UNet learns what each embedding means; what matters is that
distinct prompts get distinct, fixed embeddings.

The tokenizer is :func:`~diffusers_guda.testing.tiny_clip_tokenizer` over the recipe's
``vocabulary``; its vocabulary is part of the recipe, never taken from the data (a model trained
without a group would otherwise get another tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffusers_guda.data import GroupedDataset
from diffusers_guda.errors import ConfigError, DataError

from .training import TrainConfig


@dataclass
class TextTrainConfig(TrainConfig):
    """:class:`TrainConfig` of a text-conditioned pixel-space UNet (``"conditioning": "text"`` in a recipe).

    The UNet has cross-attention blocks at every level; ``attention`` and the other
    :class:`TrainConfig` fields keep their meaning.
    """

    conditioning: str = field(default="text", metadata={"help": "Marks a text-conditioned recipe; must be 'text'."})
    vocabulary: tuple[str, ...] = field(default=("digit",), metadata={"help": "Whole-word tokens of the tokenizer (letters and digits are always tokens)."})
    max_length: int = field(default=8, metadata={"help": "Tokens per prompt, BOS and EOS included."})
    cross_attention_dim: int = field(default=32, metadata={"help": "Width of the text encoder and of the UNet's cross-attention."})
    text_layers: int = field(default=2, metadata={"help": "Transformer layers of the frozen text encoder."})
    attention_heads: int = field(default=4, metadata={"help": "Attention heads of the UNet's attention blocks and of the text encoder."})
    text_seed: int = field(default=0, metadata={"help": "Seed of the frozen text encoder's weights (shared by every model of a recipe)."})

    def __post_init__(self):
        super().__post_init__()
        self.vocabulary = tuple(self.vocabulary)
        if self.conditioning != "text":
            raise ConfigError(f"conditioning must be 'text', got {self.conditioning!r}.")
        if self.max_length < 3:
            raise ConfigError(f"max_length must be >= 3 (BOS, a token, EOS), got {self.max_length}.")
        if self.cross_attention_dim % self.attention_heads:
            raise ConfigError(f"attention_heads={self.attention_heads} must divide cross_attention_dim={self.cross_attention_dim}.")

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["vocabulary"] = list(self.vocabulary)
        return data

    def build_tokenizer(self):
        from diffusers_guda.testing import tiny_clip_tokenizer

        try:
            return tiny_clip_tokenizer(self.vocabulary, max_length=self.max_length)
        except ValueError as exc:
            raise ConfigError(f"vocabulary: {exc}") from exc

    def build_text_encoder(self, vocab_size: int):
        """The frozen text encoder, initialised from ``text_seed`` (the global RNG is left as it was)."""
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.text_seed)
            encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=vocab_size, hidden_size=self.cross_attention_dim, intermediate_size=2 * self.cross_attention_dim,
                num_hidden_layers=self.text_layers, num_attention_heads=self.attention_heads,
                max_position_embeddings=self.max_length, projection_dim=self.cross_attention_dim,
                bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ))
        return encoder.eval().requires_grad_(False)

    def build_unet(self, image_shape: tuple[int, int, int]):
        from diffusers import UNet2DConditionModel

        channels, height, levels = self._check_image_shape(image_shape)
        return UNet2DConditionModel(
            sample_size=height, in_channels=channels, out_channels=channels,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
            cross_attention_dim=self.cross_attention_dim, attention_head_dim=self.attention_heads,
            norm_num_groups=self.norm_num_groups,
        )

    def build_pipeline(self, image_shape: tuple[int, int, int]):
        """The untrained :class:`~diffusers_guda.pipelines.text_to_image.TextToImageDDPMPipeline`."""
        from diffusers_guda.pipelines.text_to_image import TextToImageDDPMPipeline

        tokenizer = self.build_tokenizer()
        text_encoder = self.build_text_encoder(len(tokenizer.get_vocab()))
        return TextToImageDDPMPipeline(unet=self.build_unet(image_shape), scheduler=self.build_scheduler(),
                                       text_encoder=text_encoder, tokenizer=tokenizer)

    def training_conditioning(self, pipeline, dataset: GroupedDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the distinct prompts (each encoded alone, sorted) and each image's row among them.

        Raises:
            DataError: if the dataset has no prompts.
        """
        if dataset.prompts is None:
            raise DataError("This recipe trains a text-conditioned model, but the dataset has no prompts; give every image "
                            "its caption (metadata.jsonl with a 'text' field) or use an unconditional recipe.")
        distinct = sorted(set(dataset.prompts))
        row = {p: i for i, p in enumerate(distinct)}
        table = torch.cat([pipeline.encode_prompt(p, "cpu")[0] for p in distinct])
        return table, torch.tensor([row[p] for p in dataset.prompts], dtype=torch.long)


def train_config_class(section: dict) -> type[TrainConfig]:
    """The config class of a recipe's ``train`` section: :class:`TextTrainConfig` when it says ``"conditioning": "text"``."""
    return TextTrainConfig if isinstance(section, dict) and "conditioning" in section else TrainConfig
