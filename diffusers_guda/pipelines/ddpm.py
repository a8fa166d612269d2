"""``GUDADDPMPipeline``: a ``DDPMPipeline`` that can unlearn groups and attribute images."""

from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel

from ..hashing import base_state_dict
from ..models import with_adapter_support
from .mixin import GUDAPipelineMixin


class GUDADDPMPipeline(DDPMPipeline, GUDAPipelineMixin):
    """An unconditional DDPM pipeline with group attribution.

    Loads like ``DDPMPipeline`` (``from_pretrained`` of any DDPM pipeline directory or Hub id, or
    ``from_pipe``) and generates identically; a ``UNet2DModel`` is given adapter support without
    copying its weights. Adapters live in bundles: ``save_pretrained`` writes the base model only, as
    a stock ``DDPMPipeline`` directory.

    Example:
        ```py
        >>> from diffusers_guda import GUDADDPMPipeline
        >>> pipe = GUDADDPMPipeline.from_pretrained("guda-demo/base")
        >>> pipe.load_guda_bundle("guda-demo/bundle")
        >>> images = pipe(batch_size=4, output_type="np").images
        >>> result = pipe.attribute(images)
        >>> result.top(3)
        ```
    """

    # real (not postponed) annotations: DiffusionPipeline.from_pipe matches components by them
    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin):
        super().__init__(unet=with_adapter_support(unet), scheduler=scheduler)

    def save_pretrained(self, save_directory, **kwargs):
        """Save the base model as a stock ``DDPMPipeline`` directory (no LoRA wrappers, no adapters).

        Saving a UNet that holds peft wrappers would write ``base_layer`` keys that stock diffusers
        cannot load; save bundles with :meth:`AdapterBundle.save_pretrained` instead.
        """
        unet = UNet2DModel.from_config({k: v for k, v in self.unet.config.items() if not k.startswith("_")})
        unet.load_state_dict(base_state_dict(self.unet), assign=True)
        DDPMPipeline(unet=unet, scheduler=self.scheduler).save_pretrained(save_directory, **kwargs)
