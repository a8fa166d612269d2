"""The one image reader (diffusers_guda/images.py): its policy per mode, and one file giving the same model
input on every path (training folders, metadata folders, ``datasets`` rows, CLI queries, PIL queries)."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from diffusers_guda import GroupedDataset, LazyGroupedDataset
from diffusers_guda.data_files import read_image
from diffusers_guda.errors import ConfigError, DataError
from diffusers_guda.images import MAX_PIXELS_ENV, composite, max_image_pixels, open_image, standard_image
from diffusers_guda.pipelines import to_model_images
from diffusers_guda.queries import open_query_image

from conftest import TINY_RECIPE, write_group_folder
from test_cli import run

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
COLOUR = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (8, 8), dtype=np.uint8)


def encode(image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` grayscale pixels, with almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 9)) + chunk(b"IEND", b"")


def palette_with_transparency() -> bytes:
    """An 8x8 palette PNG: index 0 fully transparent, index 1 half transparent, the others opaque."""
    image = Image.fromarray((GRAY % 4).astype(np.uint8), "P")
    image.putpalette([200, 10, 10, 10, 200, 10, 10, 10, 200, 90, 90, 90] + [0] * 756)
    return encode(image, transparency=bytes([0, 128, 255, 255]))


def sixteen_bit() -> bytes:
    return encode(Image.fromarray(GRAY.astype(np.uint16) * 257 + 100))  # I;16: round(v / 257) is GRAY again


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees clockwise
    return encode(Image.fromarray(COLOUR), "JPEG", quality=95, exif=exif)


#: Files whose pixels the policy defines, as encoded bytes, each 8x8 once read.
SPECIAL = {
    "palette-transparency.png": palette_with_transparency,
    "sixteen-bit.png": sixteen_bit,
    "rgba.png": lambda: encode(Image.fromarray(np.dstack([COLOUR, ALPHA]), "RGBA")),
    "cmyk.jpg": lambda: encode(Image.fromarray(np.dstack([COLOUR, GRAY]), "CMYK"), "JPEG", quality=95),
    "exif-rotated.jpg": exif_rotated,
    "plain-rgb.png": lambda: encode(Image.fromarray(COLOUR)),
    "plain-gray.png": lambda: encode(Image.fromarray(GRAY)),
}


# -- the policy, mode by mode --------------------------------------------------------------------------


def test_plain_8_bit_images_are_returned_untouched():
    for image in (Image.fromarray(GRAY), Image.fromarray(COLOUR)):
        assert standard_image(image) is image
    array, _ = read_image(encode(Image.fromarray(COLOUR)), None)
    assert np.array_equal(array, COLOUR)  # the pixels (and so latents and scores) of plain files do not move


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 128, 129, 257, 385, 386, 1000, 65535]], dtype=np.uint16)
    expected = np.round(values / 257).astype(np.uint8)
    assert expected.tolist() == [[0, 0, 1, 1, 1, 2, 4, 255]]
    for image in (Image.open(io.BytesIO(encode(Image.fromarray(values)))), Image.frombytes("I;16B", (8, 1), values.astype(">u2").tobytes()),
                  Image.fromarray(values.astype(np.int32), "I")):
        out = standard_image(image)
        assert out.mode == "L" and np.array_equal(np.asarray(out), expected), image.mode


def test_float_images_and_out_of_range_integers_are_refused():
    with pytest.raises(DataError, match="32-bit floating-point.*8-bit"):
        standard_image(Image.new("F", (2, 2)), name="image f.tif")
    with pytest.raises(DataError, match=r"outside 0\.\.65535 \(-1\.\.70000\)"):
        standard_image(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32), "I"))


def test_alpha_is_composited_on_white():
    assert composite(np.array([0, 10, 200], np.uint8), np.array([0, 128, 255], np.uint8)).tolist() == [255, 132, 200]
    out = np.asarray(standard_image(Image.fromarray(np.dstack([COLOUR, ALPHA]), "RGBA")))
    expected = np.round((COLOUR * (ALPHA[..., None] / 255.0)) + 255 * (1 - ALPHA[..., None] / 255.0))
    assert np.abs(out.astype(int) - expected).max() == 0
    opaque = Image.fromarray(np.dstack([COLOUR, np.full_like(GRAY, 255)]), "RGBA")
    assert np.array_equal(np.asarray(standard_image(opaque)), COLOUR)  # an opaque image keeps its pixels
    gray = standard_image(Image.fromarray(np.dstack([GRAY, ALPHA]), "LA"))
    assert gray.mode == "L" and np.array_equal(np.asarray(gray), composite(GRAY, ALPHA))


def test_palette_transparency_and_colour_keys_are_honoured():
    out = np.asarray(open_image(palette_with_transparency()))
    index = GRAY % 4
    assert (out[index == 0] == 255).all()  # fully transparent: white
    assert out[index == 1].tolist()[0] == composite(np.array([10, 200, 10], np.uint8), np.array(128, np.uint8)).tolist()
    assert (out[index == 2] == [10, 10, 200]).all()
    keyed = Image.open(io.BytesIO(encode(Image.fromarray(GRAY), transparency=int(GRAY[0, 0]))))
    assert np.asarray(standard_image(keyed))[0, 0] == 255 and standard_image(keyed).mode == "L"
    opaque = Image.fromarray((GRAY % 4).astype(np.uint8), "P")
    assert np.array_equal(np.asarray(standard_image(opaque)), np.asarray(opaque.convert("RGB")))


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV", "RGBX", "P", "1"])
def test_other_modes_become_rgb_or_gray(mode):
    image = Image.fromarray(COLOUR).convert(mode) if mode not in ("LAB", "HSV") else Image.new(mode, (8, 8), (50, 60, 70))
    out = standard_image(image)
    assert out.mode == ("L" if mode == "1" else "RGB")
    assert np.array_equal(np.asarray(out), np.asarray(image.convert(out.mode)))


def test_exif_orientation_is_applied_once():
    image = open_image(exif_rotated())
    reference = ImageOps.exif_transpose(Image.open(io.BytesIO(exif_rotated())))
    assert np.array_equal(np.asarray(image), np.asarray(reference)) and not np.array_equal(np.asarray(image), COLOUR)
    assert standard_image(image) is image  # the tag is gone: reading again turns nothing


def test_animated_and_multi_frame_images_are_refused(tmp_path):
    frames = [Image.fromarray(GRAY), Image.fromarray(255 - GRAY)]
    for fmt, name in (("GIF", "anim.gif"), ("PNG", "anim.png"), ("TIFF", "pages.tif")):
        frames[0].save(tmp_path / name, fmt, save_all=True, append_images=frames[1:])
        with pytest.raises(DataError, match=rf"{name} is animated or has several frames \(2\); save the one frame"):
            open_query_image(tmp_path / name)


def test_empty_and_undecodable_files_are_named(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"Cannot read query image .*empty.png: the file is empty \(0 bytes\)"):
        open_query_image(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"Cannot read image .*text.png: cannot identify image file.*Remove or replace"):
        read_image(tmp_path / "text.png", None)


def test_decompression_bombs_are_refused_before_decoding(monkeypatch):
    limit = Image.MAX_IMAGE_PIXELS
    assert max_image_pixels() == limit
    with pytest.raises(DataError, match=r"big.png: it declares 10000x10000 = 100,000,000 pixels, more than the 89,478,485-pixel"):
        open_image(png_declaring(10000, 10000), name="image big.png")  # Pillow would only warn
    with pytest.raises(DataError, match=rf"400,000,000 pixels.*Resize the image, or .* {MAX_PIXELS_ENV}=400000000"):
        open_image(png_declaring(20000, 20000), name="image big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "32")
    with pytest.raises(DataError, match="64 pixels, more than the 32-pixel limit"):
        read_image(encode(Image.fromarray(GRAY)), None)
    monkeypatch.setenv(MAX_PIXELS_ENV, "64")
    assert np.array_equal(read_image(encode(Image.fromarray(GRAY)), None)[0], GRAY)
    monkeypatch.setenv(MAX_PIXELS_ENV, "many")
    with pytest.raises(ConfigError, match=f"{MAX_PIXELS_ENV} must be a positive number"):
        open_image(encode(Image.fromarray(GRAY)))
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's own setting is left as it was


# -- one file, one model input, on every path ------------------------------------------------------------


def every_path(tmp_path, name: str, data: bytes, mode: str | None) -> dict[str, torch.Tensor]:
    """The ``[C, H, W]`` model input of one file as each path reads it."""
    folder, captioned = tmp_path / "folder", tmp_path / "captioned"
    for group in ("a", "b"):
        (folder / group).mkdir(parents=True)
        (folder / group / name).write_bytes(data)
    captioned.mkdir()
    (captioned / name).write_bytes(data)
    shutil.copy(folder / "a" / name, captioned / f"other-{name}")
    rows = [{"file_name": name, "text": "x", "group": "a"}, {"file_name": f"other-{name}", "text": "x", "group": "b"}]
    (captioned / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    features = datasets.Features({"image": datasets.Image(), "group": datasets.Value("string")})
    rows = datasets.Dataset.from_dict({"image": [{"bytes": data, "path": None}] * 2, "group": ["a", "b"]}, features=features)
    query = open_query_image(folder / "a" / name)
    return {
        "folder": GroupedDataset.from_image_folder(folder, mode=mode).images[0],
        "lazy folder": LazyGroupedDataset.from_image_folder(folder, mode=mode).read(0)[0],
        "metadata": GroupedDataset.from_metadata(captioned, mode=mode).images[0],
        "datasets row": LazyGroupedDataset.from_hf_dataset(rows, caption_column=None, mode=mode).read(0)[0],
        "CLI query": to_model_images([query.convert(mode) if mode else query])[0],  # what guda attribute does
        # attribute(pipe, [Image.open(file)]): an L image's channel is what Pillow's RGB conversion repeats
        "PIL query": to_model_images([Image.open(folder / "a" / name)])[0].expand(3 if mode else -1, -1, -1),
    }


@pytest.mark.parametrize("name", sorted(SPECIAL))
@pytest.mark.parametrize("mode", [None, "RGB"])
def test_one_file_gives_the_same_model_input_on_every_path(tmp_path, name, mode):
    data = SPECIAL[name]()
    paths = every_path(tmp_path, name, data, mode)
    reference = paths.pop("folder")
    assert reference.shape[1:] == (8, 8)
    for path, pixels in paths.items():
        assert torch.equal(pixels, reference), path
    if mode is None:
        array = np.array(open_image(data))
        expected = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).float() / 127.5 - 1
        assert torch.equal(reference, expected)


def test_a_sixteen_bit_query_scores_as_its_8_bit_twin(tmp_path, stock_pipeline_dir):
    """``guda attribute`` gives the same scores to a 16-bit PNG and the 8-bit PNG it scales to."""
    data = write_group_folder(tmp_path / "data", ["left", "right"])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    bundle = tmp_path / "bundle"
    code, _, err = run("unlearn", "--base", stock_pipeline_dir, "--data", data, "--out", bundle, "--recipe", recipe, "--steps", 1, "--quiet")
    assert code == 0, err
    eight = np.asarray(Image.open(data / "left" / "0.png"))
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "q16.png")
    assert Image.open(tmp_path / "q16.png").mode.startswith("I")
    results = []
    for query in (data / "left" / "0.png", tmp_path / "q16.png"):
        out = tmp_path / f"{query.stem}.json"
        code, _, err = run("attribute", "--base", stock_pipeline_dir, "--bundle", bundle, "--images", query, "--out", out, "--quiet")
        assert code == 0, err
        result = json.loads(out.read_text())
        results.append({k: v for k, v in result.items() if k in ("scores", "stderr", "image_hashes", "top_group")})
    assert results[0] == results[1] and results[0]["scores"]
