"""A tiny stand-in for the emoji packages, in the real layouts: npm-style .tgz files built with ``tarfile``.

``emoji-datasource-<set>``: ``package/emoji.json`` and 64 px RGBA PNGs under ``package/img/<set>/64/``;
``openmoji``: ``package/data/openmoji.csv`` and SVGs under ``package/color/svg/``. Each emoji is a
disc of its own colour on a transparent ground (OpenMoji's a circle); ``1F535`` is a half-transparent
blue square filling the image.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from guda_lab.emoji import SOURCES, EmojiSource, integrity_of

# (unified, name, category, subcategory, colour); all in every style
COMMON = [
    ("1F600", "GRINNING FACE", "Smileys & Emotion", "face-smiling", (255, 200, 0)),
    ("1F436", "DOG FACE", "Animals & Nature", "animal-mammal", (150, 90, 40)),
    ("2764-FE0F", "RED HEART", "Smileys & Emotion", "heart", (255, 0, 0)),
    ("1F34E", "RED APPLE", "Food & Drink", "food-fruit", (220, 20, 30)),
    ("1F697", "AUTOMOBILE", "Travel & Places", "transport-ground", (200, 0, 0)),
    ("26BD", "SOCCER BALL", "Activities", "sport", (240, 240, 240)),
    ("1F4A1", "ELECTRIC LIGHT BULB", "Objects", "light & video", (255, 240, 100)),
    ("1F1EA-1F1FA", "EUROPEAN UNION FLAG", "Flags", "country-flag", (0, 50, 160)),
]
SQUARE = ("1F535", "LARGE BLUE CIRCLE", "Symbols", "geometric", (0, 0, 255))  # a half-transparent blue square
GOOGLE_ONLY = ("1FAE8", "SHAKING FACE", "Smileys & Emotion", "face-neutral-skeptical", (0, 200, 0))  # has_img_twitter false
COMPONENT = ("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component", "skin-tone", (250, 220, 190))  # left out
ALL = [*COMMON, SQUARE, GOOGLE_ONLY, COMPONENT]
#: Keys (FE0F dropped) of the emoji every style has, in codepoint order.
EXPECTED = sorted([e[0].replace("-FE0F", "") for e in [*COMMON, SQUARE]], key=lambda k: [int(c, 16) for c in k.split("-")])


def png(colour, square: bool = False, style: str = "google") -> bytes:
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    if square:
        image = Image.new("RGBA", (64, 64), (*colour, 128))
    elif style == "twitter":
        ImageDraw.Draw(image).rectangle([8, 8, 55, 55], fill=(*colour, 255))
    else:
        ImageDraw.Draw(image).ellipse([4, 4, 59, 59], fill=(*colour, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def svg(colour, square: bool = False) -> bytes:
    fill = "#{:02x}{:02x}{:02x}".format(*colour)
    shape = (f'<rect x="0" y="0" width="72" height="72" fill="{fill}" fill-opacity="0.5"/>' if square else
             f'<circle cx="36" cy="36" r="30" fill="{fill}" stroke="#000000" stroke-width="2"/>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72" width="72" height="72">{shape}</svg>'.encode()


def write_tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def emoji_json(styles=("google", "twitter", "apple", "facebook"), without=()) -> bytes:
    entries = []
    for unified, name, category, subcategory, _ in ALL:
        entry = {"name": name, "unified": unified, "image": unified.lower() + ".png", "category": category, "subcategory": subcategory}
        for style in styles:
            if style not in without:
                entry[f"has_img_{style}"] = not (style != "google" and (unified, name) == GOOGLE_ONLY[:2])
        entries.append(entry)
    return json.dumps(entries).encode()


def datasource_members(style: str, flags: bool = True) -> dict[str, bytes]:
    members = {"package/package.json": b"{}", "package/emoji.json": emoji_json(without=() if flags else (style,))}
    for unified, name, *_, colour in ALL:
        if flags and not (style != "google" and (unified, name) == GOOGLE_ONLY[:2]):
            members[f"package/img/{style}/64/{unified.lower()}.png"] = png(colour, (unified, name) == SQUARE[:2], style)
    return members


def openmoji_members() -> dict[str, bytes]:
    rows = [("emoji,hexcode,group,subgroups,annotation,tags,openmoji_tags,openmoji_author,openmoji_date,skintone,"
             "skintone_combination,skintone_base_emoji,skintone_base_hexcode,unicode,order")]
    members = {}
    for unified, name, category, subcategory, colour in ALL:
        group = "-".join(category.lower().replace("&", " ").split())
        rows.append(f"x,{unified},{group},{subcategory},{name.lower()},,,,,,,,,1,1")
        members[f"package/color/svg/{unified}.svg"] = svg(colour, (unified, name) == SQUARE[:2])
    rows.append("x,1F44B-1F3FB,people-body,hand-fingers-open,waving hand: light skin tone,,,,,1,,,1F44B,1,1")  # a skin tone: left out
    members["package/color/svg/1F44B-1F3FB.svg"] = svg((250, 220, 190))
    return {"package/package.json": b"{}", "package/data/openmoji.csv": ("\n".join(rows) + "\n").encode(), **members}


def build(folder: Path, styles=("google", "twitter", "openmoji"), version: str = "0.0.1-test") -> dict[str, EmojiSource]:
    """Write a stand-in tarball per style into ``folder``; the sources pinning them (version, sha512), as :data:`SOURCES` pins the real ones."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = {}
    for style in styles:
        real = SOURCES[style]
        source = EmojiSource(style, real.package, version, "", real.licence, real.licence_note, real.layout, real.open)
        members = openmoji_members() if real.layout == "openmoji" else datasource_members(style)
        path = write_tgz(folder / source.filename, members)
        sources[style] = EmojiSource(style, real.package, version, integrity_of(path), real.licence, real.licence_note, real.layout, real.open)
    return sources


def pin(source: EmojiSource, path: Path) -> EmojiSource:
    """``source`` pinned to the file at ``path`` (as a pinned checksum would be)."""
    return EmojiSource(source.style, source.package, source.version, integrity_of(path), source.licence, source.licence_note,
                       source.layout, source.open)
