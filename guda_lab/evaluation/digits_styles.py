"""The ``digits-styles`` benchmark: text-conditioned digits whose groups are *styles* spread over every digit.

Construction (deterministic from ``seed``; scikit-learn's embedded digits, nothing downloaded): the
images of each digit are shuffled and dealt round-robin to four style groups, so every group holds
about a quarter of every digit (~450 images) and every image is in exactly one group:

* ``plain``: the digit as it is;
* ``thick``: strokes dilated by a 2 x 2 maximum (each pixel takes the max of itself and its left,
  upper and upper-left neighbours);
* ``slanted``: sheared to an italic (row ``r`` shifted right by ``round(0.5 (3.5 - r))`` pixels:
  +2 at the top, -2 at the bottom);
* ``inverted``: contrast inversion (``-x``: dark strokes on a light ground).

Prompts. Three quarters of each group's images are captioned ``"digit 3, thick"`` (the digit and the
style word, the caption format of text-to-image style fine-tunes); the other quarter only
``"digit 3"`` (caption dropout of the style word). So the model learns both ``p(x | digit, style)``
and ``p(x | digit)``, a mixture of the four styles. Each group's descriptor is its style word
(``group_descriptors``), which the ``anchor`` objective swaps for another group's.

Why LOGO's answer is well defined here (docs/evaluation.md#benchmarks: effects must be large against LOGO's
seed-to-seed noise). Removing group ``k`` removes *every* image in style ``k``, of every digit:

* for a query generated from ``"digit 3, thick"``, the model without ``thick`` has never seen the
  word ``thick`` with an image nor any thick stroke, so the query's likelihood falls far more than
  when any other style goes (those leave every thick image in place);
* for a query generated from ``"digit 3"`` (no style word), the image lies in one style's mode of
  the mixture; only that style's removal deletes the mode. This half of the question is the
  unconditional one (which mode did the sample come from) and cannot be read off the prompt.

Pixel similarity can find ``inverted`` (its images are the negatives of the rest) but confuses
``plain``, ``thick`` and ``slanted`` images of the same digit, which overlap in most pixels; the
counterfactual answer follows the style, not the digit shape.

``digits-styles-flow`` trains the same construction as a flow-matching model, and
``digits-styles-flow-uncond`` (:func:`digits_styles_unconditional`) as an unconditional one on the
same images and groups without their prompts: every query is then a style-free one, whose style
only the image tells (docs/evaluation.md#digits-styles-flow).
"""

from __future__ import annotations

import torch

from diffusers_guda.data import GroupedDataset, load_digits

STYLES = ("plain", "thick", "slanted", "inverted")
SHEAR = 0.5
STYLE_FREE_EVERY = 4  # every 4th image of a group is captioned without its style word


def thicken_2x2(images: torch.Tensor) -> torch.Tensor:
    """Dilate bright strokes: each pixel takes the max over itself and its left, upper and upper-left neighbours."""
    padded = torch.nn.functional.pad(images, (1, 0, 1, 0), value=-1.0)
    return torch.nn.functional.max_pool2d(padded, kernel_size=2, stride=1)


def slant(images: torch.Tensor, shear: float = SHEAR) -> torch.Tensor:
    """Italic shear by whole pixels: row ``r`` moves right by ``round(shear (c - r))`` (``c`` the centre row); vacated pixels are background."""
    height, width = images.shape[-2:]
    out = torch.full_like(images, -1.0)
    centre = (height - 1) / 2
    for r in range(height):
        s = int(round(shear * (centre - r)))
        if s >= 0:
            out[..., r, s:] = images[..., r, : width - s]
        else:
            out[..., r, :s] = images[..., r, -s:]
    return out


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """``images`` ``[N, 1, H, W]`` in [-1, 1] rendered in ``style`` (one of :data:`STYLES`)."""
    if style == "plain":
        return images.clone()
    if style == "thick":
        return thicken_2x2(images)
    if style == "slanted":
        return slant(images)
    if style == "inverted":
        return -images
    raise ValueError(f"Unknown style {style!r}; styles: {', '.join(STYLES)}.")


def style_prompt(digit: int, style: str | None) -> str:
    """``"digit 3, thick"``, or ``"digit 3"`` without a style."""
    return f"digit {digit}" if style is None else f"digit {digit}, {style}"


def digits_styles(seed: int = 0, images_per_digit: int | None = None) -> GroupedDataset:
    """The ``digits-styles`` training set (4 style groups over all 10 digits, with prompts); see the module docstring.

    Args:
        seed: Seed of the shuffle that deals each digit's images to the styles.
        images_per_digit: Keep only this many (shuffled) images of each digit before dealing them
            (a smaller set with the same construction, for fast tests); default all (~180).
    """
    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[torch.Tensor, list[int]]]] = {style: [] for style in STYLES}
    for digit in range(10):
        idx = torch.nonzero(digits.group_ids == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)][:images_per_digit]
        for k, style in enumerate(STYLES):
            chosen = idx[k :: len(STYLES)]
            parts[style].append((apply_style(digits.images[chosen], style), [digit] * len(chosen)))
    images, ids, prompts = [], [], []
    for k, style in enumerate(STYLES):
        labels = [d for _, ds in parts[style] for d in ds]
        images.append(torch.cat([x for x, _ in parts[style]]))
        ids += [k] * len(labels)
        prompts += [style_prompt(d, None if i % STYLE_FREE_EVERY == STYLE_FREE_EVERY - 1 else style) for i, d in enumerate(labels)]
    return GroupedDataset(torch.cat(images), torch.tensor(ids), list(STYLES), prompts,
                          group_descriptors={style: [style] for style in STYLES})


def digits_styles_unconditional(seed: int = 0, images_per_digit: int | None = None) -> GroupedDataset:
    """The images and style groups of :func:`digits_styles` without prompts (``digits-styles-flow-uncond``)."""
    styled = digits_styles(seed, images_per_digit)
    return GroupedDataset(styled.images, styled.group_ids, styled.group_names)
