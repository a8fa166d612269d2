"""``GUDAPipelineMixin``: unlearning, bundle loading and attribution as pipeline methods."""

from __future__ import annotations

from . import attribution as ops


class GUDAPipelineMixin:
    """Adds :meth:`unlearn_groups`, :meth:`load_guda_bundle` and :meth:`attribute` to a diffusers pipeline.

    The pipeline needs a denoiser (a ``unet``, or the ``transformer`` of Stable Diffusion 3 and Flux)
    and a DDPM-family or flow-matching ``scheduler``. With a ``vae`` the model is a latent model
    (images are scored through their deterministic VAE latents); with a text-conditioned denoiser
    (``UNet2DConditionModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``) and its text
    encoders, every image is conditioned on its prompt. Generation (``__call__``) is the parent
    pipeline's, untouched.
    """

    def load_guda_bundle(self, bundle, **kwargs):
        """Load an adapter bundle (object, directory or Hub repo id); see :func:`~diffusers_guda.load_guda_bundle`."""
        return ops.load_guda_bundle(self, bundle, **kwargs)

    def unload_guda_bundle(self) -> None:
        """Remove the loaded bundle's adapters; see :func:`~diffusers_guda.pipelines.unload_guda_bundle`."""
        ops.unload_guda_bundle(self)

    def unlearn_groups(self, dataset, **kwargs):
        """Unlearn every group of ``dataset`` into a bundle; see :func:`~diffusers_guda.unlearn_groups`."""
        return ops.unlearn_groups(self, dataset, **kwargs)

    def attribute(self, images, **kwargs):
        """Score query images (and their ``prompts``) against the loaded groups; see :func:`~diffusers_guda.attribute`."""
        return ops.attribute(self, images, **kwargs)

    @property
    def guda_bundle(self):
        """The loaded :class:`~diffusers_guda.AdapterBundle`, or ``None``."""
        return getattr(self, "_guda_bundle", None)
