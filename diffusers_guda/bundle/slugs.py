"""Slugs: the safe directory names that group names become inside a bundle (see docs/formats.md#slugs)."""

from __future__ import annotations

import re
import unicodedata

MAX_SLUG_LENGTH = 64
# names Windows reserves for devices in any folder: a bundle holding adapters/con/ cannot be copied there
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def slugify(name: str, taken: set[str] | None = None) -> str:
    """Turn a group name into a safe, unique directory name.

    The slug is lowercase ASCII from ``[a-z0-9_-]``, starts and ends with a letter or digit, has at
    most 64 characters and is never empty (``"group"`` stands in for names with nothing usable), so it
    cannot contain path separators or ``..``. For example ``"../x"`` becomes ``"x"`` and ``"a/b"``
    becomes ``"a-b"``. A name Windows reserves for a device gets a suffix (``"CON"`` becomes ``"con-group"``).

    Args:
        name: Any group name.
        taken: Slugs already in use. A clash gets a ``-2``, ``-3``... suffix, and the returned slug is
            added to ``taken``.

    Returns:
        The slug.
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode().lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", text).strip("-_")[:MAX_SLUG_LENGTH].strip("-_") or "group"
    if slug in RESERVED_NAMES:
        slug += "-group"
    if taken is not None:
        base, n = slug, 2
        while slug in taken:
            suffix = f"-{n}"
            slug = base[: MAX_SLUG_LENGTH - len(suffix)].rstrip("-_") + suffix
            n += 1
        taken.add(slug)
    return slug


def unique_slugs(names: list[str]) -> list[str]:
    """Slugs of ``names`` in order, made unique the way bundles do it.

    Args:
        names: Group names, in group order.

    Returns:
        One slug per name; a later name whose slug clashes with an earlier one gets a suffix.
    """
    taken: set[str] = set()
    return [slugify(name, taken) for name in names]
