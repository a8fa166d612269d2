"""LatentCache: each training image is VAE-encoded once, for every group, run and process, as encode_latents encodes it."""

from __future__ import annotations

import json
from dataclasses import dataclass

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusers_guda import GroupedDataset, LatentCache, LazyGroupedDataset
from diffusers_guda.distributed import SINGLE_PROCESS, ProcessInfo
from diffusers_guda.errors import DataError
from diffusers_guda.latent_cache import LATENT_CACHE_ENV, default_latent_cache_dir
from diffusers_guda.pipelines import GUDAStableDiffusionPipeline
from diffusers_guda.pipelines.conditioning import encode_latents
from diffusers_guda.testing import tiny_stable_diffusion

from conftest import SD_WORDS
from test_cli import run

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")


class CountingVAE:
    """Counts the pipeline VAE's encoder forwards (one per image)."""

    def __init__(self, vae):
        self.calls, self.original = 0, vae.encode
        vae.encode = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(words=SD_WORDS, pipeline_class=GUDAStableDiffusionPipeline)


def write_styles(root, per_group=3, size=16, start=0):
    """``root/metadata.jsonl`` over ``per_group`` random RGB images in each of two colour styles."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for g, group in enumerate(["red", "blue"]):
        for i in range(start, start + per_group):
            rng = np.random.default_rng(100 * g + i)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{group}-{i}.png")
            rows.append({"file_name": f"{group}-{i}.png", "text": f"a square in {group} style", "group": group})
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
    return root


def shards(cache) -> list:
    return sorted(cache.directory.glob("*")) if cache.directory.exists() else []


def test_cached_latents_are_encode_latents_bit_for_bit_and_reused(pipe, tmp_path):
    root = write_styles(tmp_path / "data")
    counter = CountingVAE(pipe.vae)
    lazy = LazyGroupedDataset.from_metadata(root, mode="RGB")
    expected = encode_latents(pipe, GroupedDataset.from_metadata(root, mode="RGB").images)
    counter.calls = 0
    cache = LatentCache(pipe.vae, tmp_path / "cache", shard_size=4)
    latents = cache.encode(lazy, process=SINGLE_PROCESS)
    assert torch.equal(latents.images, expected) and counter.calls == cache.encoded == 6 and cache.reused == 0
    assert latents.prompts == lazy.prompts and latents.group_names == ["blue", "red"] and latents.size_conditions is None
    assert len(shards(cache)) == 2  # 4 + 2: written every shard_size images, no temporary files left
    with safe_open(str(shards(cache)[0]), framework="pt") as shard:
        assert shard.metadata()["vae_fingerprint"] == cache.fingerprint and cache.directory.name == f"vae-{cache.fingerprint[:16]}"
    again = LatentCache(pipe.vae, tmp_path / "cache")  # another object, another run: nothing encoded
    assert torch.equal(again.encode(lazy, process=SINGLE_PROCESS).images, expected)
    assert counter.calls == 6 and again.encoded == 0 and again.reused == 6
    write_styles(root, per_group=2, start=3)  # new images: only they are encoded
    grown = LazyGroupedDataset.from_metadata(root, mode="RGB")
    again.encode(grown, process=SINGLE_PROCESS)
    assert (again.encoded, again.reused, counter.calls) == (4, 6, 10)
    # in-memory pixels go through the cache when one is given, with the same keys
    eager = LatentCache(pipe.vae, tmp_path / "cache").encode(GroupedDataset.from_metadata(root, mode="RGB"), process=SINGLE_PROCESS)
    assert counter.calls == 10 and torch.equal(eager.images[:6], expected)


def test_two_unlearn_groups_calls_encode_each_image_once(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv(LATENT_CACHE_ENV, str(tmp_path / "default-cache"))
    root = write_styles(tmp_path / "data")
    counter = CountingVAE(pipe.vae)
    lazy = LazyGroupedDataset.from_metadata(root, mode="RGB")
    settings = dict(steps=1, batch_size=2, lora_rank=2, progress=False, process=SINGLE_PROCESS)
    first = pipe.unlearn_groups(lazy, groups=["red"], **settings)
    assert counter.calls == 6  # every image once, though both groups' images are used (forget and retain)
    second = pipe.unlearn_groups(lazy, groups=["blue"], **settings)
    assert counter.calls == 6 and first.group_names == ["red"] and second.group_names == ["blue"]
    assert default_latent_cache_dir() == tmp_path / "default-cache" and any((tmp_path / "default-cache").rglob("shard-*"))
    # the bundle equals the one made from in-memory pixels (bit-identical latents)
    eager = pipe.unlearn_groups(GroupedDataset.from_metadata(root, mode="RGB"), groups=["blue"], **settings)
    for slug, tensors in eager.adapters.items():
        assert all(torch.equal(v, second.adapters[slug][k]) for k, v in tensors.items())


def test_a_cache_of_another_vae_is_never_used(pipe, tmp_path, caplog):
    root = write_styles(tmp_path / "data", per_group=2)
    lazy = LazyGroupedDataset.from_metadata(root, mode="RGB")
    cache = LatentCache(pipe.vae, tmp_path / "cache")
    cache.encode(lazy, process=SINGLE_PROCESS)
    other = tiny_stable_diffusion(words=SD_WORDS, seed=1, pipeline_class=GUDAStableDiffusionPipeline)
    other_cache = LatentCache(other.vae, tmp_path / "cache")
    assert other_cache.directory != cache.directory
    latents = other_cache.encode(lazy, process=SINGLE_PROCESS)
    assert other_cache.encoded == 4 and torch.equal(latents.images, encode_latents(other, lazy.load().images))
    # a shard of another VAE inside this VAE's folder (copied there) is skipped with a warning and rebuilt
    (path,) = shards(other_cache)
    tensors = load_file(str(path))
    path.unlink()
    save_file(tensors, str(other_cache.directory / "shard-copied.safetensors"), metadata={"format": "diffusers-guda-latents",
              "format_version": "1", "vae_fingerprint": cache.fingerprint})
    (other_cache.directory / "shard-truncated.safetensors").write_bytes(b"\x10\x00")
    fresh = LatentCache(other.vae, tmp_path / "cache")
    assert torch.equal(fresh.encode(lazy, process=SINGLE_PROCESS).images, latents.images) and fresh.encoded == 4
    assert "another VAE" in caplog.text and "unreadable" in caplog.text


def test_a_corrupt_image_is_named_and_leaves_no_shard(pipe, tmp_path):
    root = write_styles(tmp_path / "data", per_group=3)
    (root / "red-1.png").write_bytes(b"\x89PNG broken")
    lazy = LazyGroupedDataset.from_metadata(root, mode="RGB")
    cache = LatentCache(pipe.vae, tmp_path / "cache")
    with pytest.raises(DataError, match=r"Cannot read image .*red-1.png \(index 1\)"):
        cache.encode(lazy, process=SINGLE_PROCESS)
    assert shards(cache) == []  # the unfinished shard is not written, and no temporary file is left


def test_sizes_the_vae_cannot_take_name_the_fix(pipe, tmp_path):
    odd = write_styles(tmp_path / "odd", per_group=1, size=15)  # not a multiple of the VAE's factor 2
    cache = LatentCache(pipe.vae, tmp_path / "cache")
    with pytest.raises(DataError, match=r"15x15, but this VAE downsamples by 2.*resolution=N \(CLI: --resolution N\)"):
        cache.encode(LazyGroupedDataset.from_metadata(odd, mode="RGB"), process=SINGLE_PROCESS)
    mixed = write_styles(tmp_path / "mixed", per_group=2)
    Image.new("RGB", (8, 8)).save(mixed / "blue-1.png")
    with pytest.raises(DataError, match=r"blue-1.png \(index 3\) is 8x8, but image 0 is 16x16.*resolution=N"):
        cache.encode(LazyGroupedDataset.from_metadata(mixed, mode="RGB"), process=SINGLE_PROCESS)
    with pytest.raises(DataError, match="1 channel.*mode='RGB'"):
        cache.encode(LazyGroupedDataset.from_metadata(odd, mode="L"), process=SINGLE_PROCESS)
    # with a resolution every image fits, and the latents keep each image's size conditions
    latents = cache.encode(LazyGroupedDataset.from_metadata(mixed, mode="RGB", resolution=8), process=SINGLE_PROCESS)
    assert latents.images.shape == (4, 4, 4, 4) and latents.size_conditions[:, 0].tolist() == [16, 16, 16, 8]


@dataclass(frozen=True)
class GatheredProcess(ProcessInfo):
    """A process of a launch whose collectives return the other ranks' parts computed beforehand."""

    others: tuple = ()

    def gather(self, obj):
        parts = list(self.others)
        parts.insert(self.rank, obj)
        return parts


def test_processes_share_the_missing_images_and_read_each_others_shards(pipe, tmp_path):
    root = write_styles(tmp_path / "data", per_group=5)
    lazy = LazyGroupedDataset.from_metadata(root, mode="RGB")
    counter = CountingVAE(pipe.vae)
    single = LatentCache(pipe.vae, tmp_path / "single").encode(lazy, process=SINGLE_PROCESS).images
    counter.calls = 0
    cache = LatentCache(pipe.vae, tmp_path / "shared")
    shares = [cache.encode_share(lazy, ProcessInfo(rank=r, world_size=3)) for r in (1, 2)]
    assert [[i for i, _, _ in s] for s in shares] == [[1, 4, 7], [2, 5, 8]] and counter.calls == 6
    rank0 = GatheredProcess(rank=0, world_size=3, others=tuple(shares))
    latents = cache.encode(lazy, process=rank0)  # encodes its share (0, 3, 6, 9), reads the others' shards
    assert counter.calls == 10 and cache.encoded == 4 and torch.equal(latents.images, single)
    assert len(shards(cache)) == 3  # one shard per process
    # a rerun with another number of processes encodes nothing
    counter.calls = 0
    rerun = [cache.encode_share(lazy, ProcessInfo(rank=r, world_size=2)) for r in (0, 1)]
    assert counter.calls == 0 and sorted(i for s in rerun for i, _, _ in s) == list(range(10))


def test_guda_unlearn_reads_a_datasets_folder_through_the_cache(tiny_sd_dir, tmp_path):
    root = write_styles(tmp_path / "data")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict(
        {"img": [str(root / r["file_name"]) for r in rows], "style": [r["group"] for r in rows], "text": [r["text"] for r in rows]},
    ).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    flags = ["--base", tiny_sd_dir, "--steps", 1, "--batch-size", 2, "--rank", 2, "--quiet", "--latent-cache", tmp_path / "cache"]
    code, _, err = run("unlearn", "--data", tmp_path / "saved", "--image-column", "img", "--group-column", "style", "--out", tmp_path / "b1", *flags)
    assert code == 0, err
    code, _, err = run("unlearn", "--data", root, "--out", tmp_path / "b2", *flags)  # the same images as a folder
    assert code == 0, err
    assert len(list((tmp_path / "cache").rglob("shard-*.safetensors"))) == 1  # the folder run encoded nothing new
    first, second = (json.loads((tmp_path / b / "guda_bundle.json").read_text()) for b in ("b1", "b2"))
    assert [g["name"] for g in first["groups"]] == [g["name"] for g in second["groups"]] == ["blue", "red"]
    code, _, err = run("unlearn", "--data", tmp_path / "saved", "--group-column", "style", "--out", tmp_path / "b3", *flags)
    assert code == 2 and "no column 'image'" in err and "--image-column" in err


LAUNCHED = '''
import json, sys
import torch
from diffusers_guda import LatentCache, LazyGroupedDataset
from diffusers_guda.distributed import current_process
from diffusers_guda.errors import DataError
from diffusers_guda.testing import tiny_stable_diffusion

torch.set_num_threads(1)
good, bad, cache_dir = sys.argv[1:4]
pipe, process = tiny_stable_diffusion(), current_process()
cache = LatentCache(pipe.vae, cache_dir)
latents = cache.encode(LazyGroupedDataset.from_metadata(good, mode="RGB"), process=process)
try:
    cache.encode(LazyGroupedDataset.from_metadata(bad, mode="RGB"), process=process)
    error = None
except DataError as exc:
    error = str(exc)
report = {"rank": process.rank, "encoded": cache.encoded, "sum": float(latents.images.double().sum()), "error": error}
open(f"{cache_dir}-report-{process.rank}.json", "w").write(json.dumps(report))
'''


def test_two_launched_processes_split_the_encoding_and_share_errors(tmp_path):
    """A real torchrun launch (2 CPU processes over gloo): each encodes its share; a bad image fails both."""
    import os
    import subprocess
    import sys

    from test_distributed import REPO

    good = write_styles(tmp_path / "good", per_group=3)
    bad = write_styles(tmp_path / "bad", per_group=3)
    (bad / "red-1.png").write_bytes(b"broken")  # index 1: in process 1's share
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                           str(good), str(bad), str(tmp_path / "cache")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = [json.loads((tmp_path / f"cache-report-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1] and reports[0]["sum"] == reports[1]["sum"]
    assert [r["encoded"] for r in reports] == [0, 0]  # the bad dataset's images 0, 2.. are cached; 1 fails
    for r in reports:
        assert "red-1.png (index 1)" in r["error"]
    assert len(list((tmp_path / "cache").rglob("shard-*"))) == 2  # one per process; the failed share wrote nothing
