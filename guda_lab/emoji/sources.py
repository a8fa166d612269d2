"""Where the emoji styles come from: npm packages pinned by version and sha512, read without extracting them.

Each style is one design team's drawing of the same emoji, published on the npm registry:

* ``emoji-datasource-<set>`` (iamcal's emoji-data): 64 px PNGs under ``package/img/<set>/64/`` and
  ``package/emoji.json`` (names, categories, ``has_img_<set>`` flags). The package code is MIT; the
  images keep their makers' licences (its README): Google Noto Apache-2.0, Twemoji CC-BY-4.0, Apple
  and Facebook proprietary.
* ``openmoji``: SVGs under ``package/color/svg/<HEXCODE>.svg`` (no PNGs in any npm release) and
  ``package/data/openmoji.csv``; CC-BY-SA-4.0. Rendered at 64 px with ``resvg-py``.

:data:`SOURCES` pins each package's version and its registry ``dist.integrity`` (sha512). A tarball
is checked against it before anything in it is read; its members are read into memory by exact name,
never extracted, and a member path that is absolute or climbs out (``..``) rejects the whole tarball.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from diffusers_guda.errors import ConfigError, DataError

REGISTRY = "https://registry.npmjs.org"
#: Image size read from every package (the emoji-datasource PNGs; OpenMoji's SVGs are rendered at it).
SOURCE_SIZE = 64


@dataclass(frozen=True)
class EmojiSource:
    """One style's npm package, pinned.

    Attributes:
        style: The style (group) name, a lowercase word.
        package: The npm package name.
        version: The pinned version.
        integrity: The registry's ``dist.integrity`` of that version: ``sha512-<base64 digest>``.
        licence: SPDX id (or ``proprietary``) of the *images*.
        licence_note: Who holds them and on what terms.
        layout: ``emoji-datasource`` or ``openmoji``.
        open: Openly licensed (a default style).
    """

    style: str
    package: str
    version: str
    integrity: str
    licence: str
    licence_note: str
    layout: str = "emoji-datasource"
    open: bool = True

    @property
    def filename(self) -> str:
        return f"{self.package}-{self.version}.tgz"

    @property
    def url(self) -> str:
        return f"{REGISTRY}/{self.package}/-/{self.filename}"

    def pin(self) -> dict:
        """What the prepared dataset records of this source."""
        return {"package": self.package, "version": self.version, "integrity": self.integrity, "licence": self.licence,
                "licence_note": self.licence_note, "url": self.url}


def _datasource(style: str, integrity: str, licence: str, note: str, open_: bool = True) -> EmojiSource:
    return EmojiSource(style, f"emoji-datasource-{style}", "16.0.0", integrity, licence, note, "emoji-datasource", open_)


#: The pinned packages, by style (versions and integrities read from the registry on 2026-12-05).
SOURCES: dict[str, EmojiSource] = {s.style: s for s in (
    _datasource("google", "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
                "Apache-2.0", "Google Noto Emoji images, Apache License 2.0"),
    _datasource("twitter", "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
                "CC-BY-4.0", "Twemoji images (Twitter, now jdecked/twemoji), Creative Commons Attribution 4.0"),
    EmojiSource("openmoji", "openmoji", "17.0.0",
                "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
                "CC-BY-SA-4.0", "OpenMoji (HfG Schwaebisch Gmuend), Creative Commons Attribution-ShareAlike 4.0", "openmoji"),
    _datasource("apple", "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
                "proprietary", "Apple Color Emoji images, (c) Apple Inc., not licensed for commercial use", open_=False),
    _datasource("facebook", "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
                "proprietary", "Facebook emoji images, (c) Facebook, Inc., no clear licence", open_=False),
)}
#: The openly licensed styles, prepared by default.
DEFAULT_STYLES: tuple[str, ...] = tuple(s for s, src in SOURCES.items() if src.open)


def check_styles(styles, sources: dict[str, EmojiSource] | None = None) -> tuple[str, ...]:
    """``styles`` in the canonical (table) order, checked.

    Raises:
        ConfigError: an unknown style, a style named twice, or fewer than two styles.
    """
    sources = SOURCES if sources is None else sources
    styles = list(DEFAULT_STYLES if styles is None else styles)
    unknown = [s for s in styles if s not in sources]
    if unknown:
        raise ConfigError(f"Unknown emoji style(s) {unknown}; known: {', '.join(sources)} "
                          f"(openly licensed: {', '.join(s for s in sources if sources[s].open)}).")
    twice = sorted({s for s in styles if styles.count(s) > 1})
    if twice:
        raise ConfigError(f"--styles names {', '.join(twice)} more than once; name each once.")
    if len(styles) < 2:
        raise ConfigError(f"--styles needs at least two styles (the groups); got {styles}.")
    return tuple(s for s in sources if s in styles)


def integrity_of(path: str | os.PathLike) -> str:
    """The npm ``dist.integrity`` string (``sha512-<base64>``) of a file."""
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def verify(path: Path, source: EmojiSource, fix: str = "delete it and rerun to download it again") -> None:
    """Refuse a tarball whose sha512 is not the pinned one.

    Raises:
        DataError: naming the file, both checksums and the fix.
    """
    found = integrity_of(path)
    if found != source.integrity:
        raise DataError(f"Checksum mismatch for {path}: expected {source.integrity[:24]}..., got {found[:24]}... "
                        f"(not {source.package} {source.version} as published); {fix} from {source.url}.")


def tarball(source: EmojiSource, cache_dir: Path, tarball_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The verified tarball of ``source``: from ``tarball_dir`` when given (never downloads), else from
    ``cache_dir/tarballs/``, downloaded there once (to a temporary file, kept only once verified).

    Raises:
        ConfigError: the tarball is not in ``tarball_dir``, or the download failed.
        DataError: its checksum is not the pinned one.
    """
    if tarball_dir is not None:
        path = Path(tarball_dir) / source.filename
        if not path.is_file():
            raise ConfigError(f"Missing tarball {path} for style {source.style!r}; download {source.url} into "
                              f"{tarball_dir} or drop --tarball-dir to download it.")
        verify(path, source, fix="replace it with the one published")
        return path
    path = cache_dir / "tarballs" / source.filename
    if path.is_file():
        verify(path, source)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.filename}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _download(source, out, progress)
        verify(Path(tmp), source)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _download(source: EmojiSource, out, progress: bool) -> None:
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    try:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {source.filename}", disable=not progress) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"Could not download {source.url} ({exc}); check the connection, or download it by hand and "
                          "pass --tarball-dir DIR holding it.") from exc


@dataclass
class Emoji:
    """One emoji as a source describes it: its key (codepoints without FE0F), name, category, subcategory."""

    key: str
    name: str
    category: str
    subcategory: str


def emoji_key(codepoints: str) -> str:
    """Codepoints as matched across sources: uppercase hex joined by ``-``, variation selector FE0F dropped."""
    return "-".join(cp for cp in codepoints.upper().replace("_", "-").split("-") if cp and cp != "FE0F")


def words(label: str) -> str:
    """A category label as lowercase words: ``"Smileys & Emotion"`` and ``"smileys-emotion"`` -> ``"smileys emotion"``."""
    cleaned = "".join(ch if ch.isalnum() else " " for ch in label.lower())
    return " ".join(cleaned.split())


def _safe(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def read_members(path: Path, source: EmojiSource, wanted, progress: bool = True) -> dict[str, bytes]:
    """The bytes of the regular-file members of a tarball that ``wanted(name)`` selects, read in one pass.

    Raises:
        DataError: a corrupt tarball, or a member path that is absolute or contains ``..`` (nothing is used).
    """
    from tqdm.auto import tqdm

    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in tqdm(archive, desc=f"read {path.name}", unit=" files", disable=not progress, leave=False):
                if not _safe(member.name):
                    raise DataError(f"Tarball {path} holds an unsafe member path {member.name!r} (absolute or with '..'); "
                                    f"it is not {source.package} {source.version}: delete it.")
                if member.isfile() and wanted(member.name):
                    found[member.name] = archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"Tarball {path} is corrupt ({type(exc).__name__}: {exc}); delete it and download "
                        f"{source.url} again.") from exc
    return found


def read_source(path: Path, source: EmojiSource, progress: bool = True) -> tuple[list[Emoji], dict[str, bytes], str]:
    """The emoji of ``source``'s style in its tarball: ``(emoji, image bytes by key, image kind 'png' or 'svg')``.

    Only base emoji (no skin-tone variants) with an image in the tarball; the ``Component`` category
    (skin-tone swatches, hair parts) and OpenMoji's own extras (not Unicode emoji) are left out.

    Raises:
        DataError: the tarball lacks its index file, or has no image of the style.
    """
    if source.layout == "openmoji":
        index, prefix, kind = "package/data/openmoji.csv", "package/color/svg/", "svg"
    else:
        index, prefix, kind = "package/emoji.json", f"package/img/{source.style}/{SOURCE_SIZE}/", "png"
    members = read_members(path, source, lambda n: n == index or (n.startswith(prefix) and n.endswith("." + kind)), progress)
    if index not in members:
        raise DataError(f"Tarball {path} has no {index}; it is not a {source.layout} package ({source.package} {source.version}).")
    images = {n[len(prefix):]: data for n, data in members.items() if n != index}
    try:
        text = members[index].decode("utf-8")
        rows = _openmoji_rows(text) if source.layout == "openmoji" else _datasource_rows(text, source.style)
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"Tarball {path}: cannot read {index} ({exc}); the package is corrupt.") from exc
    if rows is None or not images:
        raise DataError(f"Package {source.package} {source.version} ({path}) has no {source.style!r} images "
                        f"(no {prefix}*.{kind}{'' if source.layout == 'openmoji' else f' or has_img_{source.style} flags'}); "
                        f"choose another style or source.")
    emoji, data = [], {}
    for key, name, category, subcategory, file in rows:
        if file in images and words(category) != "component" and key not in data:
            emoji.append(Emoji(key, name, words(category), words(subcategory)))
            data[key] = images[file]
    return emoji, data, kind


def _datasource_rows(text: str, style: str):
    entries = json.loads(text)
    flag = f"has_img_{style}"
    if not any(flag in e for e in entries):
        return None
    return [(emoji_key(e["unified"]), e["name"].lower(), e["category"], e["subcategory"], e["image"]) for e in entries if e.get(flag)]


def _openmoji_rows(text: str):
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("skintone") or row["group"].startswith("extras"):
            continue
        rows.append((emoji_key(row["hexcode"]), row["annotation"].lower(), row["group"], row["subgroups"], f"{row['hexcode']}.svg"))
    return rows
