"""The emoji benchmarks: real colour art, the same emoji drawn by independent design teams (groups = styles).

Built from the dataset ``guda prepare emoji-styles`` writes (:mod:`.prepare`; default styles
``google``, ``twitter``, ``openmoji`` at 16 x 16 RGB). Every style holds every emoji common to the
styles, so the groups differ only in *style*: the "same content, different artistic style" setting of
the GUDA paper's Stable Diffusion experiment.

``emoji-styles`` (text-conditioned, GUDA-C). Captions are one word for the emoji's Unicode
*category* (:data:`CATEGORY_WORDS`: ``smileys``, ``person``, ``animals``, ``food``, ``travel``,
``activities``, ``objects``, ``symbols``, ``flags``) and the style word: ``"smileys, google"``; a
quarter of each style's images only ``"smileys"`` (caption dropout of the style word, as in
``digits-styles``; the dropped quarter is rotated by style, so no emoji loses its style word in two
styles). Why categories, one word each: a fixed vocabulary of 12 words (9 categories, Component left
out, and the 3 styles) that the recipe's tiny tokenizer holds as single tokens (its merge chains
collide for some word sets: ``people`` next to ``openmoji`` is spelled out letter by letter, hence
``person``), captions of at most three tokens, and 9 x 4 = 36 distinct prompts, so 100 queries (the
distinct prompts in sorted order, cycled) cover every prompt; the ~100 subcategories would give
~400 prompts, and the queries would see only the alphabetically first. Each group's descriptor is
its style word.

``emoji-styles-uncond`` (unconditional, GUDA-U): the same images and groups without captions; which
style a query is in has to be read from the image.

``emoji-contributors`` (unconditional): the most similar group is not the counterfactual answer. The
emoji are shuffled (``seed``) and cut in quarters; a ``collector`` holds the first style's drawings of
the first quarter, the second style's of the second quarter, ... (a quarter of every style, each emoji
in at most one of its styles: 476 images per style at the default styles); each style group keeps the
other three quarters of its style. For a query in style ``s`` the nearest training image is the
collector's about a quarter of the time (it holds a quarter of ``s``), so nearest neighbour names the
collector there; but removing the collector leaves three quarters of ``s`` (and every emoji's content
in the other styles), while removing ``s``'s group leaves only the collector's quarter of ``s``.
Expected LOGO answer: the query's style group above ``collector`` (comparison ``collector``).
"""

from __future__ import annotations

import numpy as np
import torch

from diffusers_guda.data import GroupedDataset

from .prepare import load_prepared

STYLE_FREE_EVERY = 4  # every 4th image of a style is captioned without its style word
COLLECTOR = "collector"
COLLECTOR_SHARE_INVERSE = 4  # the collector holds a quarter of every style
#: The caption word of each Unicode category (as the prepared metadata spells it).
CATEGORY_WORDS = {"smileys emotion": "smileys", "people body": "person", "animals nature": "animals", "food drink": "food",
                  "travel places": "travel", "activities": "activities", "objects": "objects", "symbols": "symbols", "flags": "flags"}


def emoji_prompt(category: str, style: str | None) -> str:
    """``"smileys, google"`` for category ``"smileys emotion"``, or ``"smileys"`` without a style
    (a category outside :data:`CATEGORY_WORDS` is captioned by its first word)."""
    word = CATEGORY_WORDS.get(category, category.split()[0])
    return word if style is None else f"{word}, {style}"


def emoji_styles(seed: int = 0) -> GroupedDataset:
    """The ``emoji-styles`` training set (groups = styles, with captions); see the module docstring.

    ``seed`` is unused (the construction is fixed); it is there for the loaders' common signature.

    Raises:
        ConfigError: the data are not prepared (run ``guda prepare emoji-styles``).
    """
    data = load_prepared()
    prompts = []
    for style_id, emoji_id in zip(data.style_ids.tolist(), data.emoji_ids.tolist()):
        free = (emoji_id + style_id) % STYLE_FREE_EVERY == STYLE_FREE_EVERY - 1
        prompts.append(emoji_prompt(data.emoji[emoji_id]["category"], None if free else data.styles[style_id]))
    return GroupedDataset(data.images, data.style_ids, list(data.styles), prompts,
                          group_descriptors={style: [style] for style in data.styles})


def emoji_styles_unconditional(seed: int = 0) -> GroupedDataset:
    """The images and style groups of :func:`emoji_styles` without captions (``emoji-styles-uncond``)."""
    data = load_prepared()
    return GroupedDataset(data.images, data.style_ids, list(data.styles))


def emoji_contributors(seed: int = 0) -> GroupedDataset:
    """The ``emoji-contributors`` training set: the style groups less a quarter each, held by ``collector``; see the module docstring."""
    data = load_prepared()
    n, k = len(data.emoji), len(data.styles)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    share = n // COLLECTOR_SHARE_INVERSE
    collected = torch.zeros(len(data.images), dtype=torch.bool)
    for s in range(k):
        chosen = order[(s % COLLECTOR_SHARE_INVERSE) * share:(s % COLLECTOR_SHARE_INVERSE + 1) * share]
        collected |= (data.style_ids == s) & torch.isin(data.emoji_ids, chosen)
    group_ids = torch.where(collected, torch.tensor(k), data.style_ids)
    return GroupedDataset(data.images, group_ids, [*data.styles, COLLECTOR])


def contributors_comparisons(dataset: GroupedDataset, queries: torch.Tensor) -> list:
    """The ``collector`` comparison of ``emoji-contributors``: on every query, the query's style group
    above ``collector``.

    A query's style is told by a pixel 1-nearest-neighbour classifier that looks at no attribution
    score, fitted on every training image labelled with its true style (the collector's images by the
    style they are drawn in); on the real 16 px data it names the style of held-out emoji 81% of the
    time (5 neighbours: 76%). ``[]`` for queries of another shape or a dataset without ``collector``.
    """
    from sklearn.neighbors import KNeighborsClassifier

    from ..evaluation.benchmarks import GroupComparison

    if COLLECTOR not in dataset.group_names or tuple(queries.shape[1:]) != tuple(dataset.images.shape[1:]) or len(queries) < 2:
        return []
    styles = [name for name in dataset.group_names if name != COLLECTOR]
    data = load_prepared()
    labels = data.style_ids.numpy()
    classifier = KNeighborsClassifier(n_neighbors=1).fit(data.images.flatten(1).numpy(), labels)
    style = classifier.predict(queries.flatten(1).numpy())
    own = np.array([dataset.group_index(data.styles[int(s)]) if data.styles[int(s)] in styles else -1 for s in style])
    selected = np.flatnonzero(own >= 0)
    if len(selected) < 2:
        return []
    return [GroupComparison(
        "collector", "every query: its style's group (three quarters of the style) above collector (a quarter of every style; "
        "the nearest training image about a quarter of the time)", selected, own[selected],
        np.full(len(selected), dataset.group_index(COLLECTOR)))]
