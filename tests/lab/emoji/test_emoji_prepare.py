"""``guda prepare emoji-styles`` on a stand-in with the real packages' layout: common emoji, colour, cache, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from emoji_standin import EXPECTED, SQUARE, build, datasource_members, pin, write_tgz
from safetensors.numpy import load_file

from diffusers_guda.cli import main
from diffusers_guda.errors import ConfigError, DataError
from guda_lab.emoji import SOURCES, dataset_dir, load_prepared, prepare_emoji_styles

PNG_STYLES = ("google", "twitter")


@pytest.fixture
def standin(tmp_path):
    folder = tmp_path / "tarballs"
    return folder, build(folder, PNG_STYLES)


def prepared(cache: Path, folder: Path, sources, styles=PNG_STYLES, size: int = 16) -> Path:
    return prepare_emoji_styles(list(styles), size, cache_dir=cache, tarball_dir=folder, sources=sources, progress=False)


def no_dataset(cache: Path) -> bool:
    return not cache.exists() or not any(cache.iterdir())


def test_prepare_keeps_the_emoji_of_every_style(standin, tmp_path):
    folder, sources = standin
    out = prepared(tmp_path / "cache", folder, sources)
    assert out == tmp_path / "cache" / "emoji-styles-google-twitter-16px"
    meta = json.loads((out / "metadata.json").read_text())
    # the google-only emoji is dropped, the Component swatch left out, FE0F ignored
    assert [e["codepoints"] for e in meta["emoji"]] == EXPECTED
    assert meta["available"] == {"google": len(EXPECTED) + 1, "twitter": len(EXPECTED)} and meta["common"] == len(EXPECTED)
    heart = meta["emoji"][EXPECTED.index("2764")]
    assert heart == {"codepoints": "2764", "name": "red heart", "category": "smileys emotion", "subcategory": "heart"}
    assert meta["styles"] == ["google", "twitter"] and meta["size"] == 16 and meta["background"] == [255, 255, 255]
    assert meta["image_style"] == [0] * len(EXPECTED) + [1] * len(EXPECTED)
    assert meta["image_emoji"] == list(range(len(EXPECTED))) * 2
    for style in PNG_STYLES:
        assert meta["sources"][style]["integrity"] == sources[style].integrity and meta["sources"][style]["version"] == "0.0.1-test"
        assert meta["sources"][style]["licence"] == SOURCES[style].licence
    images = load_file(str(out / "images.safetensors"))["images"]
    assert images.dtype == np.uint8 and images.shape == (2 * len(EXPECTED), 3, 16, 16)


def test_colour_is_kept_and_alpha_composited_on_white(standin, tmp_path):
    folder, sources = standin
    prepared(tmp_path / "cache", folder, sources, size=8)
    data = load_prepared(["google", "twitter"], 8, cache_dir=tmp_path / "cache")
    assert data.images.shape == (2 * len(EXPECTED), 3, 8, 8) and data.styles == ["google", "twitter"]
    assert data.images.min() >= -1.0 and data.images.max() <= 1.0
    n = len(EXPECTED)
    red = EXPECTED.index("2764")
    for style in range(2):
        image = data.images[style * n + red]
        assert image[:, 4, 4].tolist() == [1.0, -1.0, -1.0]  # the red heart's centre, red
        assert image[:, 0, 0].tolist() == [1.0, 1.0, 1.0]  # a transparent corner, the white background
    blue = data.images[EXPECTED.index(SQUARE[0])]  # half-transparent blue on white: (127, 127, 255)
    assert blue[2].eq(1.0).all() and blue[:2].sub(0.0).abs().max() < 0.01
    # the two styles draw the same emoji differently (disc and square): corners of the disc's box differ
    assert not np.allclose(data.images[red].numpy(), data.images[n + red].numpy())


def test_prepare_is_deterministic(standin, tmp_path):
    folder, sources = standin
    a, b = prepared(tmp_path / "a", folder, sources), prepared(tmp_path / "b", folder, sources)
    for name in ("images.safetensors", "metadata.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_openmoji_svgs_are_rendered(tmp_path):
    pytest.importorskip("resvg_py")
    folder = tmp_path / "tarballs"
    sources = build(folder, ("google", "openmoji"))
    out = prepared(tmp_path / "cache", folder, sources, styles=("google", "openmoji"))
    meta = json.loads((out / "metadata.json").read_text())
    assert [e["codepoints"] for e in meta["emoji"]] == sorted(
        [*EXPECTED, "1FAE8"], key=lambda k: [int(c, 16) for c in k.split("-")])  # openmoji has the shaking face too
    assert meta["available"]["openmoji"] == len(EXPECTED) + 1  # no skin-tone variant, no Component
    data = load_prepared(["google", "openmoji"], cache_dir=tmp_path / "cache")
    n = len(meta["emoji"])
    red = [e["codepoints"] for e in meta["emoji"]].index("2764")
    centre = data.images[n + red][:, 8, 8]
    assert centre.tolist() == [1.0, -1.0, -1.0] and data.images[n + red][:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_a_second_prepare_reuses_the_cache_without_reading_tarballs(standin, tmp_path):
    folder, sources = standin
    first = prepared(tmp_path / "cache", folder, sources)
    stamp = (first / "images.safetensors").stat().st_mtime_ns
    shutil.rmtree(folder)
    assert prepared(tmp_path / "cache", folder, sources) == first  # no tarball needed
    assert (first / "images.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="Missing tarball"):  # another size is another dataset: it reads them
        prepared(tmp_path / "cache", folder, sources, size=8)


def bad_missing(folder, sources):
    (folder / sources["twitter"].filename).unlink()
    return sources, ConfigError, "Missing tarball .*emoji-datasource-twitter-0.0.1-test.tgz.*--tarball-dir"


def bad_corrupt(folder, sources):
    path = folder / sources["twitter"].filename
    path.write_bytes(path.read_bytes()[:200])  # truncated, and pinned as it is now
    return {**sources, "twitter": pin(sources["twitter"], path)}, DataError, "is corrupt"


def bad_checksum(folder, sources):
    path = folder / sources["twitter"].filename
    write_tgz(path, datasource_members("twitter") | {"package/extra.txt": b"changed"})
    return sources, DataError, "Checksum mismatch for .*emoji-datasource-twitter"


def bad_style_missing(folder, sources):
    path = write_tgz(folder / sources["twitter"].filename, datasource_members("twitter", flags=False))
    return {**sources, "twitter": pin(sources["twitter"], path)}, DataError, "has no 'twitter' images"


def bad_traversal(folder, sources):
    path = write_tgz(folder / sources["twitter"].filename, {"../evil.png": b"x", **datasource_members("twitter")})
    return {**sources, "twitter": pin(sources["twitter"], path)}, DataError, "unsafe member path '../evil.png'"


def bad_not_a_package(folder, sources):
    path = write_tgz(folder / sources["twitter"].filename, {"package/package.json": b"{}"})
    return {**sources, "twitter": pin(sources["twitter"], path)}, DataError, "has no package/emoji.json"


@pytest.mark.parametrize("make", [bad_missing, bad_corrupt, bad_checksum, bad_style_missing, bad_traversal, bad_not_a_package])
def test_bad_tarballs_raise_one_line_errors_and_leave_no_cache(standin, tmp_path, make):
    folder, sources = standin
    sources, error, message = make(folder, sources)
    cache = tmp_path / "cache"
    with pytest.raises(error, match=message) as caught:
        prepared(cache, folder, sources)
    assert "\n" not in str(caught.value)
    assert no_dataset(cache)
    assert not (tmp_path / "evil.png").exists()


def test_unknown_style_and_bad_size(standin, tmp_path):
    folder, sources = standin
    with pytest.raises(ConfigError, match=r"Unknown emoji style\(s\) \['noto'\]; known: google, twitter"):
        prepared(tmp_path / "cache", folder, sources, styles=("google", "noto"))
    with pytest.raises(ConfigError, match="at least two styles"):
        prepared(tmp_path / "cache", folder, sources, styles=("google",))
    with pytest.raises(ConfigError, match="--size must be"):
        prepared(tmp_path / "cache", folder, sources, size=100)
    assert no_dataset(tmp_path / "cache")


def test_loading_an_unprepared_dataset_names_the_prepare_command(tmp_path):
    with pytest.raises(ConfigError, match=r"run `guda prepare emoji-styles --size 8 --cache-dir .*` first"):
        load_prepared(size=8, cache_dir=tmp_path)
    assert dataset_dir(None, 16, tmp_path) == tmp_path / "emoji-styles-google-twitter-openmoji-16px"


def test_the_command_prints_a_one_line_error_for_tarballs_that_are_not_the_pinned_ones(standin, tmp_path, capsys):
    folder, _ = standin
    for style in ("google", "twitter"):  # stand-ins under the real names: their checksums are not the pinned ones
        (folder / f"{SOURCES[style].package}-0.0.1-test.tgz").rename(folder / SOURCES[style].filename)
    code = main(["prepare", "emoji-styles", "--styles", "twitter", "google", "--tarball-dir", str(folder),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "guda prepare: error: Checksum mismatch" in err
    assert no_dataset(tmp_path / "cache")
    code = main(["prepare", "emoji-styles", "--styles", "google", "emoji", "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert code == 2 and "Unknown emoji style(s) ['emoji']" in capsys.readouterr().err


def test_the_prepare_command_documents_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["prepare", "--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    assert done.value.code == 0 and "emoji-styles" in out
    for option in ("--styles", "--size", "--cache-dir", "--tarball-dir", "CC-BY-SA-4.0", "proprietary"):
        assert option in out, option
