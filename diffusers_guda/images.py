"""The one image reader: every training image and every query image becomes pixels by the same rules.

Training folders, ``metadata.jsonl`` folders, ``datasets`` rows, the query files of ``guda attribute``
and the PIL images passed to ``attribute()`` all go through :func:`standard_image`, so one file gives
the same model input on every path. The policy (docs/formats.md#image-reading):

* EXIF orientation is applied (``ImageOps.exif_transpose``).
* 8-bit grayscale (``L``) and RGB stay as they are, bit for bit; bilevel (``1``) becomes ``L`` (0 or 255).
* 16-bit grayscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I`` holding values in 0..65535)
  becomes ``L`` by ``round(value / 257)``; 32-bit float (``F``), and ``I`` outside 0..65535, are refused.
* Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, a palette or colour key with
  transparency) is composited onto white: ``round((c * a + 255 * (255 - a)) / 255)`` per channel.
  An opaque image keeps its pixels; grayscale stays ``L``, everything else becomes ``RGB``.
* Palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` and ``RGBX`` become ``RGB`` (Pillow's
  conversions; embedded ICC profiles are not applied).
* Animated or multi-frame images (GIF, APNG, WebP, TIFF) are refused.
* Images declaring more pixels than the decompression-bomb limit (Pillow's ``MAX_IMAGE_PIXELS``, or
  the environment variable ``GUDA_MAX_IMAGE_PIXELS``) are refused before they are decoded.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError

MAX_PIXELS_ENV = "GUDA_MAX_IMAGE_PIXELS"
WHITE = 255
_GRAY_ALPHA = {"LA", "La"}
_COLOUR_ALPHA = {"RGBA", "RGBa", "PA"}
_TO_RGB = {"P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_LIMIT_LOCK = threading.Lock()


def open_image(source: str | os.PathLike | bytes, mode: str | None = None, name: str | None = None):
    """Open, fully decode and standardize one image file (or its encoded bytes).

    Args:
        source: A file path or the encoded image's bytes.
        mode: ``"L"`` or ``"RGB"`` to convert the result to, or ``None`` to keep it ``L`` or ``RGB``.
        name: How error messages name the image, e.g. ``"query image q.png"`` (default ``"image <path>"``).

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``L`` or ``RGB`` (``mode`` when given), as :func:`standard_image` makes it.

    Raises:
        DataError: one line naming the image, when it is empty, cannot be decoded, is animated, is a
            float image, or declares more pixels than the decompression-bomb limit (see :func:`max_image_pixels`).
    """
    from PIL import Image

    name = name or f"image {source if not isinstance(source, bytes) else '(bytes)'}"
    size = len(source) if isinstance(source, bytes) else _file_size(Path(source), name)
    if size == 0:
        raise DataError(f"Cannot read {name}: the file is empty (0 bytes). Remove or replace the file.")
    limit = max_image_pixels()
    try:
        with _pillow_limit(limit), Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            _check_pixels(img.size, limit, name)
            _check_frames(img, name)
            img.load()
            image = standard_image(img, name=name)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        raise _bomb_error(name, int(declared.group(1)) if declared else None, limit) from exc
    except (OSError, ValueError, EOFError, SyntaxError, struct.error) as exc:  # what Pillow raises on broken files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise DataError(f"Cannot read {name}: {reason}. Remove or replace the file.") from exc
    return image if mode is None or image.mode == mode else image.convert(mode)


def standard_image(image, name: str = "image"):
    """A PIL image in mode ``L`` or ``RGB`` by the reader's policy (see the module docstring).

    An 8-bit ``L`` or ``RGB`` image without EXIF rotation or colour-key transparency is returned as
    it is (the same object, the same pixels); the result of this function is returned unchanged by it.

    Args:
        image: A ``PIL.Image.Image`` (loaded or not).
        name: How error messages name the image.

    Returns:
        The image in mode ``L`` or ``RGB``.

    Raises:
        DataError: an animated or multi-frame image, a 32-bit float image, or 32-bit integers outside 0..65535.
    """
    from PIL import Image, ImageOps

    _check_frames(image, name)
    if image.getexif().get(0x0112, 1) not in (0, 1):  # the EXIF orientation tag
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    key = image.info.get("transparency")
    if mode == "1":
        return image.convert("L")
    if mode == "F":
        raise DataError(
            f"{_capital(name)} is a 32-bit floating-point image, which has no agreed pixel scale; save it as an "
            "8-bit (or 16-bit) PNG with values in 0..255 (0..65535)."
        )
    if mode.startswith("I"):
        return _from_16_bit(image, name, key)
    if mode == "L" and isinstance(key, int):
        gray = np.asarray(image)
        return Image.fromarray(composite(gray, np.where(gray == key, 0, 255).astype(np.uint8)), "L")
    if mode in _GRAY_ALPHA:
        array = np.asarray(image.convert("LA") if mode == "La" else image)
        return Image.fromarray(composite(array[..., 0], array[..., 1]), "L")
    if mode in _COLOUR_ALPHA or (key is not None and mode in ("P", "RGB")):
        array = np.asarray(image.convert("RGBA"))
        return Image.fromarray(composite(array[..., :3], array[..., 3]), "RGB")
    if mode in ("L", "RGB"):
        return image
    if mode in _TO_RGB:
        return image.convert("RGB")
    raise DataError(f"{_capital(name)} has the image mode {mode!r}, which diffusers-guda does not read; save it as an 8-bit RGB PNG.")


def composite(color: np.ndarray, alpha: np.ndarray, background: int = WHITE) -> np.ndarray:
    """``color`` (``[H, W]`` or ``[H, W, C]`` uint8) over a flat ``background`` with ``alpha`` (``[H, W]`` uint8).

    Each channel becomes ``round((c * a + background * (255 - a)) / 255)`` in integer arithmetic:
    opaque pixels (``a = 255``) keep their value exactly, transparent ones become ``background``.
    """
    a = alpha.astype(np.uint32)
    a = a[..., None] if color.ndim == 3 else a
    return ((color.astype(np.uint32) * a + background * (255 - a) + 127) // 255).astype(np.uint8)


def max_image_pixels() -> int | None:
    """The decompression-bomb limit, in pixels: ``GUDA_MAX_IMAGE_PIXELS`` when set, else Pillow's
    ``PIL.Image.MAX_IMAGE_PIXELS`` (``None``: no limit). An image declaring more pixels is refused.

    Raises:
        ConfigError: ``GUDA_MAX_IMAGE_PIXELS`` is not a positive integer.
    """
    from PIL import Image

    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None or not value.strip():
        return Image.MAX_IMAGE_PIXELS
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(f"{MAX_PIXELS_ENV} must be a positive number of pixels (e.g. 200000000), got {value!r}.")
    return int(value)


@contextmanager
def _pillow_limit(limit: int | None):
    """Pillow's own checks at ``limit`` while an image is opened (its setting is restored after, and left
    alone when ``limit`` is its own), with its warning between one and two times the limit silenced: the
    reader refuses those images itself."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if limit == Image.MAX_IMAGE_PIXELS:
            yield
            return
        with _LIMIT_LOCK:
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(size: tuple[int, int], limit: int | None, name: str) -> None:
    if limit is not None and size[0] * size[1] > limit:
        raise _bomb_error(name, size[0] * size[1], limit, size)


def _bomb_error(name: str, pixels: int | None, limit: int | None, size: tuple[int, int] | None = None) -> DataError:
    declared = f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels" if pixels else "too many pixels"
    return DataError(
        f"Cannot read {name}: it declares {declared}, more than the {limit:,}-pixel limit that guards against "
        f"decompression bombs. Resize the image, or if it is intended set the environment variable "
        f"{MAX_PIXELS_ENV}={pixels or 2 * limit} (or more)."
    )


def _check_frames(image, name: str) -> None:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise DataError(f"{_capital(name)} is animated or has several frames ({frames}); save the one frame you mean as a PNG.")


def _from_16_bit(image, name: str, key):
    """``L`` from a 16-bit (or 32-bit integer) grayscale image: ``round(value / 257)``, a colour key composited on white."""
    from PIL import Image

    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(
            f"{_capital(name)} holds 32-bit integer values outside 0..65535 ({values.min()}..{values.max()}); "
            "save it as an 8-bit or 16-bit image."
        )
    gray = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): no value lies halfway
    if isinstance(key, int):
        gray = composite(gray, np.where(values == key, 0, 255).astype(np.uint8))
    return Image.fromarray(gray, "L")


def _file_size(path: Path, name: str) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DataError(f"Cannot read {name}: {exc.strerror or exc}. Check the path.") from exc


def _capital(name: str) -> str:
    return name[:1].upper() + name[1:]
