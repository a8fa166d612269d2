"""LazyGroupedDataset: image folders and ``datasets`` datasets read one image at a time, as the eager reader reads them."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_guda import GroupedDataset, LazyGroupedDataset
from diffusers_guda.errors import DataError

from test_data import write_image_folder, write_metadata_folder, write_png


def reference(path, mode=None) -> torch.Tensor:
    """``[C, H, W]`` in [-1, 1], decoded here independently of the package."""
    with Image.open(path) as img:
        array = np.asarray(img.convert(mode) if mode else img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


@pytest.mark.parametrize("mode", [None, "RGB"])
def test_image_folder_lazy_reads_what_the_eager_reader_holds(tmp_path, mode):
    root = write_image_folder(tmp_path / "data", per_group=2)
    write_png(root / "dogs" / "more" / "extra.png", seed=99)
    write_png(root / "dogs" / ".ipynb_checkpoints" / "skip.png", seed=98)
    lazy = LazyGroupedDataset.from_image_folder(root, mode=mode)
    eager = GroupedDataset.from_image_folder(root, mode=mode)
    assert len(lazy) == len(eager) == 7 and lazy.group_names == eager.group_names == ["birds", "cats", "dogs"]
    assert torch.equal(lazy.group_ids, eager.group_ids) and lazy.group_sizes() == [2, 2, 3] and lazy.prompts is None
    for i, path in enumerate(lazy.images.paths):
        pixels, size = lazy.read(i)
        assert torch.equal(pixels, reference(path, mode)) and torch.equal(eager.images[i], pixels)
        assert size == (5, 6, 0, 0, 5, 6)
    assert eager.size_conditions is None  # images used at their own size


def test_metadata_lazy_keeps_rows_prompts_and_descriptors(tmp_path):
    root = write_metadata_folder(tmp_path / "data", descriptors={"ink": ["black lines"]})
    lazy = LazyGroupedDataset.from_metadata(root)
    eager = GroupedDataset.from_metadata(root)
    assert lazy.group_names == eager.group_names == ["ink", "pastel", "watercolour"]
    assert lazy.prompts == eager.prompts and lazy.group_descriptors == eager.group_descriptors == {"ink": ["black lines"]}
    assert torch.equal(lazy.group_ids, eager.group_ids)
    assert torch.equal(torch.stack([lazy.read(i)[0] for i in range(len(lazy))]), eager.images)
    lazy.require_prompts()
    with pytest.raises(DataError, match="no prompts"):
        LazyGroupedDataset.from_image_folder(write_image_folder(tmp_path / "folder")).require_prompts()


def test_membership_errors_are_the_eager_readers(tmp_path):
    """Scanning refuses bad layouts before any image is decoded, with the eager reader's messages."""
    root = write_image_folder(tmp_path / "data", groups=("a", "b"))
    (root / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt is not an image"):
        LazyGroupedDataset.from_image_folder(root)
    with pytest.raises(DataError, match="does not exist"):
        LazyGroupedDataset.from_metadata(tmp_path / "nowhere")
    with pytest.raises(DataError, match="mode"):
        LazyGroupedDataset.from_image_folder(tmp_path / "data", mode="CMYK")
    with pytest.raises(DataError, match="resolution must be a positive integer"):
        LazyGroupedDataset.from_image_folder(write_image_folder(tmp_path / "ok"), resolution=0)


def test_a_corrupt_image_is_named_with_its_index_when_read(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"), per_group=3)
    (root / "a" / "img1.png").write_bytes(b"not a png at all")
    lazy = LazyGroupedDataset.from_image_folder(root)  # scanning decodes nothing
    lazy.read(0)
    with pytest.raises(DataError, match=r"Cannot read image .*img1.png \(index 1\)"):
        lazy.read(1)
    with pytest.raises(DataError, match=r"img1.png \(index 1\)"):
        lazy.load()


def test_resolution_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    root = tmp_path / "data"
    write_png(root / "a" / "wide.png", size=(20, 12), mode="RGB", seed=1)  # width 20, height 12
    write_png(root / "b" / "tall.png", size=(9, 15), mode="RGB", seed=2)
    write_png(root / "b" / "small.png", size=(4, 4), mode="RGB", seed=3)  # upscaled
    lazy = LazyGroupedDataset.from_image_folder(root, resolution=8)
    sizes = [lazy.read(i)[1] for i in range(3)]
    # wide: 12x20 -> 8x13 (torchvision's int()), crop left round(2.5) = 2; tall: 15x9 -> 13x8, top round(2.5) = 2
    assert sizes == [(12, 20, 0, 2, 8, 8), (4, 4, 0, 0, 8, 8), (15, 9, 2, 0, 8, 8)]
    with Image.open(root / "a" / "wide.png") as img:
        expected = np.asarray(img.resize((13, 8), Image.Resampling.BICUBIC).crop((2, 0, 10, 8)), dtype=np.float32)
    assert torch.equal(lazy.read(0)[0], torch.from_numpy(expected.transpose(2, 0, 1) / 127.5 - 1.0))
    loaded = lazy.load()
    assert loaded.images.shape == (3, 3, 8, 8) and loaded.size_conditions.tolist() == [list(s) for s in sizes]
    assert torch.equal(GroupedDataset.from_image_folder(root, resolution=8).images, loaded.images)  # deterministic
    with pytest.raises(DataError, match="different sizes"):
        LazyGroupedDataset.from_image_folder(root).load()


# -- datasets ----------------------------------------------------------------------------------------


def hf_dataset(tmp_path, class_label=True, n=6):
    """A ``datasets.Dataset`` of encoded PNGs (from files written to ``tmp_path/png``), groups and captions."""
    files = [write_png(tmp_path / "png" / f"{i}.png", size=(8, 8), mode="RGB", seed=i) for i in range(n)]
    groups = ["oil", "ink", "oil", "chalk", "ink", "oil"][:n]
    features = datasets.Features({
        "image": datasets.Image(),
        "style": datasets.ClassLabel(names=["chalk", "unused", "ink", "oil"]) if class_label else datasets.Value("string"),
        "caption": datasets.Value("string"),
    })
    rows = {"image": [{"bytes": f.read_bytes(), "path": None} for f in files], "style": groups,
            "caption": [f"a picture, {g}" for g in groups]}
    return datasets.Dataset.from_dict(rows, features=features), files


@pytest.mark.parametrize("class_label", [True, False])
def test_a_datasets_dataset_gives_the_files_pixels(tmp_path, class_label):
    ds, files = hf_dataset(tmp_path, class_label)
    lazy = LazyGroupedDataset.from_hf_dataset(ds, group_column="style", caption_column="caption")
    # a ClassLabel keeps its label order (unused labels dropped); strings are sorted
    assert lazy.group_names == (["chalk", "ink", "oil"] if class_label else ["chalk", "ink", "oil"])
    assert [lazy.group_names[g] for g in lazy.group_ids.tolist()] == ["oil", "ink", "oil", "chalk", "ink", "oil"]
    assert lazy.prompts[3] == "a picture, chalk"
    folder = LazyGroupedDataset(type(lazy.images)(ds, "image", "x"), lazy.group_ids, lazy.group_names)  # same rows
    for i, path in enumerate(files):
        assert torch.equal(lazy.read(i)[0], reference(path)) and torch.equal(folder.read(i)[0], reference(path))
    assert LazyGroupedDataset.from_hf_dataset(ds, group_column="style", caption_column=None).prompts is None


def test_save_to_disk_and_data_folders_load_through_datasets(tmp_path):
    ds, files = hf_dataset(tmp_path, class_label=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1, 3])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    kwargs = dict(group_column="style", caption_column="caption")
    saved = LazyGroupedDataset.from_hf_dataset(tmp_path / "saved", **kwargs)
    parquet = LazyGroupedDataset.from_hf_dataset(str(tmp_path / "pq"), cache_dir=tmp_path / "hf-cache", **kwargs)
    test_split = LazyGroupedDataset.from_hf_dataset(tmp_path / "dict", split="test", **kwargs)
    assert len(saved) == len(parquet) == 6 and len(test_split) == 3
    assert saved.group_names == parquet.group_names and saved.prompts == parquet.prompts
    for i in range(6):
        assert torch.equal(saved.read(i)[0], parquet.read(i)[0])
    assert torch.equal(test_split.read(2)[0], reference(files[3]))
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['test', 'train'\]\).*split="):
        LazyGroupedDataset.from_hf_dataset(tmp_path / "dict", split="validation", **kwargs)


@pytest.mark.parametrize("keyword, flag", [("image_column", "image-column"), ("group_column", "group-column"), ("caption_column", "caption-column")])
def test_a_missing_column_is_named_with_the_columns_and_the_keyword(tmp_path, keyword, flag):
    ds, _ = hf_dataset(tmp_path)
    kwargs = dict(group_column="style", caption_column="caption")
    kwargs[keyword] = "nope"
    with pytest.raises(DataError) as info:
        LazyGroupedDataset.from_hf_dataset(ds, **kwargs)
    message = str(info.value)
    assert "no column 'nope'" in message and "['image', 'style', 'caption']" in message
    assert f"{keyword}=" in message and f"--{flag}" in message and "\n" not in message
    with pytest.raises(DataError, match="no column 'group'.*group_column="):  # the default names
        LazyGroupedDataset.from_hf_dataset(ds, caption_column=None)


def test_a_corrupt_row_and_bad_groups_are_named(tmp_path):
    ds, _ = hf_dataset(tmp_path)
    rows = ds.cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"][4] = {"bytes": b"garbage", "path": None}
    broken = datasets.Dataset.from_dict(rows, features=ds.cast_column("image", datasets.Image(decode=False)).features)
    lazy = LazyGroupedDataset.from_hf_dataset(broken, group_column="style", caption_column="caption", name="'styles'")
    with pytest.raises(DataError, match=r"Cannot read image in row 4 of 'styles' \(column 'image'\)"):
        lazy.load()
    with pytest.raises(DataError, match="Row 1 of the dataset has no caption in column 'caption'"):
        LazyGroupedDataset.from_hf_dataset(ds.map(lambda r, i: {"caption": "" if i == 1 else r["caption"]}, with_indices=True),
                                           group_column="style", caption_column="caption")
    one = ds.filter(lambda r: r["style"] == 3)
    with pytest.raises(DataError, match="at least 2 groups"):
        LazyGroupedDataset.from_hf_dataset(one, group_column="style", caption_column=None)


def test_metadata_files_listing_prompts_survive_a_round_trip(tmp_path):
    """The eager loader is the lazy one's load(): the same rows, sizes and errors (see test_data.py)."""
    root = write_metadata_folder(tmp_path / "data")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    lazy = LazyGroupedDataset.from_metadata(root)
    assert [str(p.relative_to(root)) for p in lazy.images.paths] == [r["file_name"] for r in rows]
