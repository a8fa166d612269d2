"""``GUDADDPMPipeline``: a ``DDPMPipeline`` that can unlearn groups and attribute images."""

from __future__ import annotations

from diffusers import DDPMPipeline

from ..models import with_adapter_support
from .mixin import GUDAPipelineMixin


class GUDADDPMPipeline(DDPMPipeline, GUDAPipelineMixin):
    """An unconditional DDPM pipeline with group attribution.

    Loads like ``DDPMPipeline`` (``from_pretrained`` of any DDPM pipeline directory or Hub id) and
    generates identically; a ``UNet2DModel`` is given adapter support without copying its weights.

    Example:
        ```py
        >>> from diffusers_guda import GUDADDPMPipeline, load_digits
        >>> pipe = GUDADDPMPipeline.from_pretrained("guda-demo/base")
        >>> pipe.load_guda_bundle("guda-demo/bundle")
        >>> images = pipe(batch_size=4, output_type="np").images
        >>> result = pipe.attribute(images)
        >>> result.top(3)
        ```
    """

    def __init__(self, unet, scheduler):
        super().__init__(unet=with_adapter_support(unet), scheduler=scheduler)
