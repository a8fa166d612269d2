"""Testing utilities: tiny Stable Diffusion, SDXL, Stable Diffusion 3 and Flux pipelines built entirely offline, from configs in code.

The tests, the examples' ``--tiny`` runs and the lab's text model use them: every
component of a real ``StableDiffusionPipeline`` (a ``UNet2DConditionModel``, an ``AutoencoderKL``, a
``CLIPTextModel`` and a ``CLIPTokenizer``), of a ``StableDiffusionXLPipeline`` (two text encoders,
the second with a projection, and a UNet that takes SDXL's added conditions), of a
``StableDiffusion3Pipeline`` (an ``SD3Transformer2DModel``, a 16-channel VAE, two CLIP encoders and a
T5 encoder) or of a ``FluxPipeline`` (a ``FluxTransformer2DModel``, CLIP and T5), at a size that runs
in milliseconds on one CPU core, with nothing downloaded. The CLIP tokenizer is a byte-pair encoder
whose vocabulary and merges are written here: every lowercase letter and digit is a token, and each
word of ``words`` is one token. The T5 tokenizer is a Unigram model built the same way
(:func:`tiny_t5_tokenizer`).

Example:
    ```py
    >>> from diffusers_guda.testing import tiny_stable_diffusion
    >>> pipe = tiny_stable_diffusion(words=["a", "thick", "digit"])
    >>> image = pipe("a thick digit", num_inference_steps=2, output_type="np").images[0]
    >>> image.shape
    (16, 16, 3)
    ```
"""

from .pipelines import tiny_flux, tiny_stable_diffusion, tiny_stable_diffusion_3, tiny_stable_diffusion_xl
from .tokenizers import DEFAULT_WORDS, tiny_clip_tokenizer, tiny_t5_tokenizer, write_clip_vocabulary

__all__ = [
    "DEFAULT_WORDS",
    "tiny_clip_tokenizer",
    "tiny_flux",
    "tiny_stable_diffusion",
    "tiny_stable_diffusion_3",
    "tiny_stable_diffusion_xl",
    "tiny_t5_tokenizer",
    "write_clip_vocabulary",
]
