"""VAE latents of the training images, computed once and kept on disk (docs/formats.md#latent-cache).

A latent pipeline trains and scores on ``(E(x).mean - shift) * scaling_factor``
(:func:`~diffusers_guda.pipelines.conditioning.encode_latent`, one image per VAE forward). A
:class:`LatentCache` stores each image's latent in safetensors shards under a folder named after the
VAE's fingerprint, keyed by the SHA-256 of the preprocessed image, so every group, run and process
that needs an image's latent finds it there, and a rerun encodes only the images that are missing.
Only latents are ever held in memory (10,000 Stable Diffusion 1.5 latents of 512 px images: 640 MB).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import torch

from .data import GroupedDataset
from .distributed import ProcessInfo, current_process
from .errors import DataError, DistributedError, GUDAError
from .hashing import image_content_digest, model_fingerprint
from .io_utils import atomic_file, cache_dir_from_env

logger = logging.getLogger(__name__)

LATENT_CACHE_ENV = "GUDA_LATENT_CACHE"
SHARD_FORMAT = "diffusers-guda-latents"
SHARD_FORMAT_VERSION = "1"
SHARD_GLOB = "shard-*.safetensors"


def default_latent_cache_dir() -> Path:
    """``$GUDA_LATENT_CACHE`` if set, else ``<HF_HOME>/diffusers_guda/latents`` (``~/.cache/huggingface/...``)."""
    return cache_dir_from_env(LATENT_CACHE_ENV, "latents")


class LatentCache:
    """The VAE latents of training images, on disk, shared by every group, run and process.

    Args:
        vae: The pipeline's VAE (``AutoencoderKL``). Its fingerprint (a SHA-256 of its config and
            weights, dtype included) names the cache's folder and is checked in every shard read, so
            latents of another VAE are never used.
        cache_dir: The cache's root folder (default: :func:`default_latent_cache_dir`).
        shard_size: Latents per shard file: an interruption loses at most this many encodings.

    Attributes:
        directory: ``<cache_dir>/vae-<first 16 digits of the fingerprint>``, where the shards are.
        encoded: VAE forwards the last :meth:`encode` made in this process.
        reused: Images of this process's share the last :meth:`encode` found in the cache.
    """

    def __init__(self, vae, cache_dir: str | os.PathLike | None = None, shard_size: int = 256):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise DataError(f"shard_size must be an integer >= 1, got {shard_size!r}.")
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_latent_cache_dir()
        if root.is_file():
            raise DataError(f"The latent cache folder {root} is a file; pass a directory (it is created when missing).")
        self.vae = vae
        self.fingerprint = model_fingerprint(vae)
        self.root = root
        self.directory = self.root / f"vae-{self.fingerprint[:16]}"
        self.shard_size = shard_size
        self.encoded = self.reused = 0

    def __repr__(self) -> str:
        return f"LatentCache({str(self.directory)!r})"

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, dataset, progress: bool = False, process: ProcessInfo | None = None) -> GroupedDataset:
        """The dataset's latents, as a :class:`~diffusers_guda.GroupedDataset` (groups, prompts, size conditions kept).

        Each process reads every ``world_size``-th image (from its rank on), hashes it and encodes it
        if the cache lacks it, writing its own shards; the processes then exchange the hashes and every
        one reads all the latents from the cache.

        Args:
            dataset: A :class:`~diffusers_guda.lazy_data.LazyGroupedDataset` (read one image at a
                time) or a :class:`~diffusers_guda.GroupedDataset` of pixels.
            progress: Show a progress bar (main process only).
            process: This process of a launch (default: :func:`~diffusers_guda.distributed.current_process`).

        Raises:
            DataError: an image that cannot be read or does not fit the VAE (naming it and its index).
            DistributedError: the processes of a launch do not share the cache folder.
        """
        process = current_process() if process is None else process
        try:
            share = self.encode_share(dataset, process, progress=progress)
        except GUDAError as exc:  # raised on every process, not only where the bad image is
            share = exc
        parts = process.gather(share)  # also waits until every process has written its shards
        errors = [part for part in parts if isinstance(part, GUDAError)]
        if errors:
            raise errors[0]
        entries = sorted(entry for part in parts for entry in part)
        if [index for index, _, _ in entries] != list(range(len(dataset))):
            raise DistributedError("The processes of this launch were given datasets of different lengths; give every process the same data.")
        latents = self.read([digest for _, digest, _ in entries])
        if isinstance(dataset, GroupedDataset):
            sizes = dataset.size_conditions
        else:
            sizes = torch.tensor([size for _, _, size in entries], dtype=torch.long) if dataset.resolution is not None else None
        return GroupedDataset(latents, dataset.group_ids, list(dataset.group_names), dataset.prompts, dataset.group_descriptors, sizes)

    def encode_share(self, dataset, process: ProcessInfo, progress: bool = False) -> list[tuple[int, str, tuple[int, ...]]]:
        """Encode the missing images of this process's share (indices ``rank, rank + world_size, ...``).

        Returns:
            ``(index, digest, size condition)`` of every image of the share.
        """
        from tqdm.auto import tqdm

        from .pipelines.conditioning import encode_latent, vae_encoding_precision

        expected = self._expected_shape(dataset)
        known = set(self.index())
        pending: dict[str, torch.Tensor] = {}
        share, self.encoded, self.reused = [], 0, 0
        indices = range(process.rank, len(dataset), process.world_size)
        with vae_encoding_precision(self.vae):  # a float16 VAE that overflows runs in float32
            for index in tqdm(indices, desc="encode latents", disable=not (progress and process.is_main), leave=False):
                pixels, size = _read(dataset, index)
                if tuple(pixels.shape) != expected:
                    raise DataError(
                        f"Image {_describe(dataset, index)} is {_size(pixels.shape)}, but image 0 is {_size(expected)}; all images must "
                        "share one size: pass resolution=N (CLI: --resolution N) to resize and crop them all, or resize them first."
                    )
                digest = image_content_digest(pixels)
                share.append((index, digest, size))
                if digest in known or digest in pending:
                    self.reused += 1
                    continue
                pending[digest] = encode_latent(self.vae, pixels)[0].contiguous()
                self.encoded += 1
                if len(pending) >= self.shard_size:
                    known.update(self._write_shard(pending))
        known.update(self._write_shard(pending))  # an exception above leaves the unfinished shard unwritten
        return share

    def _expected_shape(self, dataset) -> tuple[int, int, int]:
        """The pixel shape every image must have (image 0's), checked against the VAE."""
        from .pipelines.conditioning import vae_scale_factor

        if len(dataset) == 0:
            raise DataError("The dataset has no images.")
        shape = tuple(_read(dataset, 0)[0].shape)
        channels = self.vae.config.in_channels
        factor = vae_scale_factor(self.vae)
        resolution = getattr(dataset, "resolution", None)
        if shape[0] != channels:
            raise DataError(
                f"Image {_describe(dataset, 0)} has {shape[0]} channel(s), but the VAE takes {channels}; "
                f"load the data with mode='{'RGB' if channels == 3 else 'L'}' (CLI: --mode)."
            )
        if shape[1] % factor or shape[2] % factor:
            fix = f"pass resolution=N with N a multiple of {factor}" if resolution is not None else (
                f"pass resolution=N (CLI: --resolution N), N a multiple of {factor}, e.g. {max(factor, min(shape[1:]) // factor * factor)}, "
                "to resize and centre-crop every image")
            raise DataError(
                f"Image {_describe(dataset, 0)} is {_size(shape)}, but this VAE downsamples by {factor}: height and width must be "
                f"multiples of {factor} (at least {factor}); {fix}."
            )
        return shape

    def _write_shard(self, latents: dict[str, torch.Tensor]) -> list[str]:
        """Write ``latents`` as one new shard (atomically: complete or absent) and empty the dict."""
        from safetensors.torch import save_file

        keys = list(latents)
        if keys:
            metadata = {"format": SHARD_FORMAT, "format_version": SHARD_FORMAT_VERSION, "vae_fingerprint": self.fingerprint}
            with atomic_file(self.directory / f"shard-{uuid.uuid4().hex}.safetensors") as tmp:
                save_file(latents, str(tmp), metadata=metadata)
            latents.clear()
        return keys

    # -- reading --------------------------------------------------------------------------------

    def index(self) -> dict[str, Path]:
        """Every cached image digest and the shard that holds it.

        Shards of another VAE, of another format, or that cannot be read are skipped (with a
        warning): their images are encoded again.
        """
        from safetensors import SafetensorError, safe_open

        found: dict[str, Path] = {}
        for path in sorted(self.directory.glob(SHARD_GLOB)):
            try:
                with safe_open(str(path), framework="pt") as shard:
                    meta = shard.metadata() or {}
                    keys = list(shard.keys())
            except (OSError, SafetensorError) as exc:
                logger.warning("Skipping unreadable latent shard %s (%s); its images are encoded again.", path, exc)
                continue
            expected = {"format": SHARD_FORMAT, "format_version": SHARD_FORMAT_VERSION, "vae_fingerprint": self.fingerprint}
            if any(meta.get(k) != v for k, v in expected.items()):
                logger.warning("Skipping latent shard %s: it was made by another VAE or format; its images are encoded again.", path)
                continue
            for key in keys:
                found.setdefault(key, path)
        return found

    def read(self, digests: list[str]) -> torch.Tensor:
        """The cached latents of ``digests``, stacked ``[N, c, h, w]`` (float32, CPU), read shard by shard.

        Raises:
            DistributedError: a digest is not in the cache (another process wrote it to a folder this
                one does not see).
        """
        from safetensors import safe_open

        index = self.index()
        missing = [d for d in digests if d not in index]
        if missing:
            raise DistributedError(
                f"{len(missing)} latent(s) are missing from {self.directory}, which another process of this launch wrote: "
                "the cache folder must be shared by every process (pass latent_cache=/--latent-cache a folder on a shared disk)."
            )
        positions: dict[Path, dict[str, list[int]]] = {}
        for position, digest in enumerate(digests):
            positions.setdefault(index[digest], {}).setdefault(digest, []).append(position)
        out = None
        for path, wanted in positions.items():
            with safe_open(str(path), framework="pt") as shard:
                for digest, where in wanted.items():
                    latent = shard.get_tensor(digest)
                    if out is None:
                        out = torch.empty(len(digests), *latent.shape, dtype=torch.float32)
                    out[where] = latent
        return out if out is not None else torch.empty(0)


def _read(dataset, index: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if isinstance(dataset, GroupedDataset):
        image = dataset.images[index]
        h, w = image.shape[-2:]
        sizes = dataset.size_conditions
        return image, tuple(sizes[index].tolist()) if sizes is not None else (h, w, 0, 0, h, w)
    return dataset.read(index)


def _describe(dataset, index: int) -> str:
    return dataset.describe(index) if hasattr(dataset, "describe") else f"at index {index}"


def _size(shape) -> str:
    return f"{shape[-1]}x{shape[-2]}"
