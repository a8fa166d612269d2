"""GroupedDataset: the digits default, in-memory arrays, image folders, and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_guda import GroupedDataset, load_digits
from diffusers_guda.errors import DataError, GUDAError

# -- load_digits ---------------------------------------------------------------------------------


def test_load_digits_shape_range_and_groups():
    data = load_digits()
    assert len(data) == 1797
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.image_shape == (1, 8, 8)
    assert data.images.dtype == torch.float32
    assert float(data.images.min()) >= -1.0 and float(data.images.max()) <= 1.0
    # the full range is used: background pixels are -1, the strongest strokes +1
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
    assert data.group_names == [str(d) for d in range(10)]
    assert data.num_groups == 10
    sizes = data.group_sizes()
    assert len(sizes) == 10 and sum(sizes) == 1797 and min(sizes) > 0
    assert data.group_ids.dtype == torch.long


# -- from_arrays ---------------------------------------------------------------------------------


def test_from_arrays_uint8_maps_to_minus_one_one():
    images = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    images[1] = 255
    images[2] = 128
    data = GroupedDataset.from_arrays(images, [0, 0, 1, 1], ["a", "b"])
    assert data.images.dtype == torch.float32
    assert torch.all(data.images[0] == -1.0)
    assert torch.all(data.images[1] == 1.0)
    assert torch.allclose(data.images[2], torch.full((1, 2, 2), 128 / 127.5 - 1.0), atol=1e-6)
    assert data.group_names == ["a", "b"]
    assert data.group_sizes() == [2, 2]


def test_from_arrays_adds_channel_to_grayscale():
    images = np.random.default_rng(0).integers(0, 256, size=(3, 5, 6), dtype=np.uint8)
    data = GroupedDataset.from_arrays(images, [0, 1, 1], ["x", "y"])
    assert data.images.shape == (3, 1, 5, 6)
    expected = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    assert torch.allclose(data.images[:, 0], expected)


def test_from_arrays_float_in_range_kept():
    images = torch.linspace(-1, 1, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    data = GroupedDataset.from_arrays(images, [0, 1], ["a", "b"], prompts=["p0", "p1"])
    assert torch.equal(data.images, images)
    assert data.prompts == ["p0", "p1"]


def test_from_arrays_float_out_of_range_names_fix():
    images = np.random.default_rng(0).uniform(0, 255, size=(4, 1, 4, 4)).astype(np.float32)
    with pytest.raises(DataError) as info:
        GroupedDataset.from_arrays(images, [0, 0, 1, 1], ["a", "b"])
    message = str(info.value)
    assert "[-1, 1]" in message
    assert "uint8" in message and "x * 2 - 1" in message  # names the fix


def _ok_images(n=4):
    return torch.zeros(n, 1, 4, 4)


@pytest.mark.parametrize(
    "ids, names, prompts, needle",
    [
        ([0, 0, 1, 1], ["a", "a"], None, "distinct"),  # duplicate names
        ([0, 0, 0, 0], ["only"], None, "at least 2"),  # a single group
        ([0, 0, 1, 1], ["a", "b", "c"], None, "'c'"),  # group c has no images
        ([0, 1, 2, 1], ["a", "b"], None, "0..1"),  # id out of range
        ([0, -1, 1, 1], ["a", "b"], None, "0..1"),  # negative id
        ([0, 0, 1, 1], ["a", "b"], ["p"] * 3, "prompts"),  # prompts length mismatch
        ([0, 0, 1], ["a", "b"], None, "group_ids"),  # ids length mismatch
    ],
)
def test_from_arrays_bad_groups(ids, names, prompts, needle):
    with pytest.raises(DataError) as info:
        GroupedDataset.from_arrays(_ok_images(), ids, names, prompts=prompts)
    assert needle in str(info.value)


def test_bad_image_layouts():
    with pytest.raises(DataError, match="shape"):
        GroupedDataset.from_arrays(np.zeros((2, 4), dtype=np.uint8), [0, 1], ["a", "b"])
    with pytest.raises(DataError, match="channels"):  # channels-last by mistake
        GroupedDataset.from_arrays(np.zeros((2, 6, 6, 3), dtype=np.uint8), [0, 1], ["a", "b"])
    bad = torch.zeros(2, 1, 4, 4)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        GroupedDataset(bad, torch.tensor([0, 1]), ["a", "b"])


# -- from_image_folder ---------------------------------------------------------------------------


def write_png(path, size=(6, 5), mode="L", seed=0):
    """Write a small image; ``size`` is (width, height) as PIL takes it."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode).save(path)
    return path


def write_image_folder(root, groups=("cats", "birds", "dogs"), per_group=2, mode="L", size=(6, 5)):
    for g, name in enumerate(groups):
        for i in range(per_group):
            write_png(root / name / f"img{i}.png", size=size, mode=mode, seed=10 * g + i)
    return root


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_image_folder_happy_path(tmp_path, mode, channels):
    root = write_image_folder(tmp_path / "data", mode=mode, per_group=2)
    # a third image in one group, inside a nested folder (rglob), to get unequal group sizes
    write_png(root / "dogs" / "more" / "extra.png", mode=mode, seed=99)
    data = GroupedDataset.from_image_folder(root)
    assert data.group_names == ["birds", "cats", "dogs"]  # sorted subfolder names
    assert data.images.shape == (7, channels, 5, 6)
    assert data.group_sizes() == [2, 2, 3]
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    # pixel values survive the trip: birds/img0.png is the first image
    raw = np.asarray(Image.open(root / "birds" / "img0.png"), dtype=np.float32) / 127.5 - 1.0
    raw = raw[None] if raw.ndim == 2 else raw.transpose(2, 0, 1)
    assert torch.allclose(data.images[0], torch.from_numpy(raw))


def test_image_folder_ignores_hidden_files(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"))
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "a" / ".hidden").write_bytes(b"junk")
    data = GroupedDataset.from_image_folder(root)
    assert len(data) == 4


def test_image_folder_only_one_group(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("solo",))
    with pytest.raises(DataError, match="at least 2"):
        GroupedDataset.from_image_folder(root)


def test_image_folder_empty_group(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"))
    (root / "empty").mkdir()
    with pytest.raises(DataError) as info:
        GroupedDataset.from_image_folder(root)
    assert "'empty'" in str(info.value) and "no images" in str(info.value)


def test_image_folder_mixed_sizes_names_odd_file(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"), per_group=3, size=(6, 5))
    write_png(root / "b" / "odd.png", size=(7, 9))
    with pytest.raises(DataError) as info:
        GroupedDataset.from_image_folder(root)
    message = str(info.value)
    assert "odd.png" in message
    assert "different sizes" in message
    assert "6x5" in message  # the common size, as width x height


def test_image_folder_non_image_file(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"))
    (root / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as info:
        GroupedDataset.from_image_folder(root)
    assert "notes.txt" in str(info.value) and "not an image" in str(info.value)


def test_image_folder_corrupt_png(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"))
    (root / "b" / "broken.png").write_bytes(np.random.default_rng(0).bytes(200))
    with pytest.raises(DataError) as info:
        GroupedDataset.from_image_folder(root)
    assert "broken.png" in str(info.value) and "Cannot read" in str(info.value)


def test_image_folder_truncated_png(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"), size=(32, 32))
    good = (root / "a" / "img0.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="truncated.png"):
        GroupedDataset.from_image_folder(root)


def test_image_folder_mixed_modes(tmp_path):
    root = tmp_path / "data"
    write_png(root / "a" / "gray.png", mode="L")
    write_png(root / "b" / "color.png", mode="RGB")
    with pytest.raises(DataError) as info:
        GroupedDataset.from_image_folder(root)
    assert "mode='L'" in str(info.value)
    gray = GroupedDataset.from_image_folder(root, mode="L")
    assert gray.images.shape == (2, 1, 5, 6)
    color = GroupedDataset.from_image_folder(root, mode="RGB")
    assert color.images.shape == (2, 3, 5, 6)
    with pytest.raises(DataError, match="mode"):
        GroupedDataset.from_image_folder(root, mode="CMYK")


def test_image_folder_stray_root_file(tmp_path):
    root = write_image_folder(tmp_path / "data", groups=("a", "b"))
    write_png(root / "loose.png")
    with pytest.raises(DataError) as info:
        GroupedDataset.from_image_folder(root)
    assert "loose.png" in str(info.value)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        GroupedDataset.from_image_folder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        GroupedDataset.from_image_folder(tmp_path / "file.png")


# -- views ---------------------------------------------------------------------------------------


def test_content_digests_change_with_each_part_of_the_data(tiny_dataset):
    base = tiny_dataset.content_digests()
    assert base == GroupedDataset(tiny_dataset.images.clone(), tiny_dataset.group_ids.clone(), tiny_dataset.group_names).content_digests()
    assert base["prompts"] is base["group_descriptors"] is base["size_conditions"] is None
    changed = {
        "images": tiny_dataset.with_images(tiny_dataset.images.flip(-1)),
        "members": GroupedDataset(tiny_dataset.images, tiny_dataset.group_ids.roll(1), tiny_dataset.group_names),
        "prompts": GroupedDataset(tiny_dataset.images, tiny_dataset.group_ids, tiny_dataset.group_names, ["p"] * len(tiny_dataset)),
        "group_descriptors": GroupedDataset(tiny_dataset.images, tiny_dataset.group_ids, tiny_dataset.group_names,
                                            group_descriptors={"left": ["bars"]}),
        "size_conditions": GroupedDataset(tiny_dataset.images, tiny_dataset.group_ids, tiny_dataset.group_names,
                                          size_conditions=torch.full((len(tiny_dataset), 6), 8)),
    }
    for part, data in changed.items():
        digests = data.content_digests()
        assert [k for k in base if digests[k] != base[k]] == [part], part
        assert len(digests[part]) == 64


def test_without_group_removes_and_remaps(tiny_dataset):
    prompts = [f"p{i}" for i in range(len(tiny_dataset))]
    data = GroupedDataset(tiny_dataset.images, tiny_dataset.group_ids, tiny_dataset.group_names, prompts)
    out = data.without_group(1)
    keep = data.group_ids != 1
    assert out.group_names == ["left", "right"]
    assert len(out) == int(keep.sum()) == 24
    assert torch.equal(out.images, data.images[keep])
    old = data.group_ids[keep]
    assert torch.equal(out.group_ids, torch.where(old == 2, torch.tensor(1), old))
    assert out.prompts == [p for p, k in zip(prompts, keep.tolist()) if k]
    # removing the first and the last group
    first = data.without_group(0)
    assert first.group_names == ["middle", "right"] and first.group_sizes() == [12, 12]
    assert torch.equal(first.images, data.images[12:])
    last = data.without_group(2)
    assert last.group_names == ["left", "middle"] and torch.equal(last.group_ids, data.group_ids[:24])


def test_indices_and_group_index(tiny_dataset):
    forget = tiny_dataset.forget_indices(1)
    retain = tiny_dataset.retain_indices(1)
    assert torch.equal(forget, torch.arange(12, 24))
    assert len(retain) == 24 and not set(retain.tolist()) & set(forget.tolist())
    assert tiny_dataset.group_index("right") == 2 and tiny_dataset.group_index(0) == 0
    with pytest.raises(DataError):
        tiny_dataset.group_index("nope")
    with pytest.raises(DataError):
        tiny_dataset.group_index(3)


def test_errors_are_guda_errors():
    assert issubclass(DataError, GUDAError)
    with pytest.raises(GUDAError):
        GroupedDataset.from_arrays(_ok_images(), [0, 0, 0, 0], ["a"])


# -- metadata.jsonl (text-image folders) -----------------------------------------------------------


def write_metadata_folder(root, rows=None, descriptors=None):
    """``root/images/*.png`` (16x16 RGB) with a metadata.jsonl naming them; optional groups.json."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    if rows is None:
        rows = []
        for group in ["watercolour", "ink", "pastel"]:
            for i in range(3):
                name = f"images/{group}-{i}.png"
                rows.append({"file_name": name, "text": f"a house, {group}", "group": group})
    for row in rows:
        path = root / row.get("file_name", "")
        if row.get("file_name") and path.suffix == ".png" and not path.exists() and "missing" not in row["file_name"]:
            Image.fromarray(rng.integers(0, 255, (16, 16, 3)).astype(np.uint8), mode="RGB").save(path)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if descriptors is not None:
        (root / "groups.json").write_text(json.dumps(descriptors))
    return root


def test_metadata_folder_with_prompts_and_descriptors(tmp_path):
    root = write_metadata_folder(tmp_path / "data", descriptors={"ink": ["black lines", "cross hatching"], "pastel": ["soft colours"]})
    data = GroupedDataset.from_metadata(root)
    assert data.group_names == ["ink", "pastel", "watercolour"]  # ordered by name
    assert data.images.shape == (9, 3, 16, 16) and data.images.min() >= -1 and data.images.max() <= 1
    assert data.prompts[0] == "a house, watercolour" and data.group_ids.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert data.group_descriptors == {"ink": ["black lines", "cross hatching"], "pastel": ["soft colours"]}
    # latents keep the captions and descriptors; removing a group removes its descriptors
    latents = data.with_images(torch.zeros(9, 4, 8, 8))
    assert latents.prompts == data.prompts and latents.group_descriptors == data.group_descriptors
    assert data.without_group(0).group_descriptors == {"pastel": ["soft colours"]}
    assert GroupedDataset.from_metadata(write_metadata_folder(tmp_path / "plain")).group_descriptors is None


@pytest.mark.parametrize(
    "row, message",
    [
        ({"file_name": "images/missing.png", "text": "a cat", "group": "ink"}, "line 10 names 'images/missing.png'.*does not exist"),
        ({"file_name": "images/ink-0.png", "group": "ink"}, "line 10 lacks text"),
        ({"file_name": "images/ink-0.png", "text": "a cat", "group": ""}, "line 10 lacks group"),
        ({"text": "a cat", "group": "ink"}, "line 10 lacks file_name"),
        ({"file_name": "../outside.png", "text": "a cat", "group": "ink"}, "outside"),
        # the same image again, under another group (or the same one): one row per image
        ({"file_name": "images/ink-0.png", "text": "a cat", "group": "pastel"}, "line 10 lists 'images/ink-0.png' again.*line 4"),
        ({"file_name": "./images/ink-0.png", "text": "a house, ink", "group": "ink"}, "lists './images/ink-0.png' again"),
    ],
)
def test_bad_metadata_rows_are_refused(tmp_path, row, message):
    root = write_metadata_folder(tmp_path / "data")
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        GroupedDataset.from_metadata(root)


def test_malformed_metadata_and_descriptors_are_refused(tmp_path):
    with pytest.raises(DataError, match="no metadata.jsonl"):
        GroupedDataset.from_metadata(tmp_path)
    root = write_metadata_folder(tmp_path / "data")
    with open(root / "metadata.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match="line 10 is not valid JSON"):
        GroupedDataset.from_metadata(root)
    root = write_metadata_folder(tmp_path / "unknown", descriptors={"oil": ["thick paint"]})
    with pytest.raises(DataError, match=r"groups.json names group\(s\) \['oil'\]"):
        GroupedDataset.from_metadata(root)
    root = write_metadata_folder(tmp_path / "badtype", descriptors={"ink": "black lines"})
    with pytest.raises(DataError, match="non-empty list"):
        GroupedDataset.from_metadata(root)


def test_a_byte_order_mark_before_metadata_is_accepted(tmp_path):
    root = write_metadata_folder(tmp_path / "data")
    (root / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + (root / "metadata.jsonl").read_bytes())
    assert len(GroupedDataset.from_metadata(root)) == 9


def test_hidden_files_and_folders_in_a_group_are_skipped_nested_ones_belong_to_it(tmp_path):
    root = write_image_folder(tmp_path / "data", per_group=2)
    write_png(root / "dogs" / ".ipynb_checkpoints" / "img0-checkpoint.png", seed=50)
    write_png(root / "dogs" / ".thumb.png", seed=51)
    write_png(root / "dogs" / "more" / "extra.png", seed=52)
    data = GroupedDataset.from_image_folder(root)
    assert data.group_sizes() == [2, 2, 3]


def test_a_dangling_link_in_a_group_is_named(tmp_path):
    root = write_image_folder(tmp_path / "data", per_group=2)
    (root / "cats" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="gone.png is a link to a file that does not exist"):
        GroupedDataset.from_image_folder(root)
