"""Terms of (image, row) items under each model of one batch of images, each computed once."""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from ..elbo import ELBOEstimator


class RowTerms:
    """Packs (image, row) items into forwards of exactly ``forward_rows`` rows and keeps their terms.

    Because a row's term does not depend on the other rows of its forward, the room left in a
    round's last forward can be filled with rows the same model needs in later rounds of an adaptive
    walk: they come out bit-identical to computing them later, and a model whose group is dropped
    first wastes them as it would waste the padding.

    Args:
        estimator: The ELBO estimator.
        images: All query images ``[N, ...]``.
        ids: The (consecutive) indices of this batch's images.
        hashes: Content hash of every query image.
        kwargs: UNet inputs of this batch's images, one entry per image along dim 0 (or ``None``).
        forward_rows: Rows per forward.
    """

    def __init__(self, estimator: ELBOEstimator, images: torch.Tensor, ids: list[int], hashes: list[int], kwargs: dict | None,
                 forward_rows: int):
        self.est, self.forward_rows, self.kwargs = estimator, forward_rows, kwargs
        self.images = images[ids[0] : ids[-1] + 1]
        self.local = {i: p for p, i in enumerate(ids)}
        self.hashes = hashes
        self.done: dict = {}  # model -> {(image, row): term}
        self._noise: dict = {}  # (image, row) -> noise, shared by every model
        self.evaluated = 0  # rows through the UNet (padding repeats excluded)

    def _noise_of(self, items) -> torch.Tensor:
        missing = {}
        for i, r in items:
            if (i, r) not in self._noise:
                missing.setdefault(i, []).append(r)
        for i, rows in missing.items():
            fresh = self.est.noise(self.images[self.local[i]], self.hashes[i], rows=torch.tensor(rows))
            self._noise.update(zip(((i, r) for r in rows), fresh))
        return torch.stack([self._noise[item] for item in items])

    def __call__(self, model: str | None, unet, who: list[int], rows: dict[int, torch.Tensor],
                 later: Callable[[int], list[torch.Tensor]] | None = None) -> dict[int, torch.Tensor]:
        """``{image: terms of rows[image]}`` under ``unet``, the model named ``model`` (``None``: the base).

        Args:
            model: The key of the model's kept terms.
            unet: The model to run.
            who: The images to evaluate.
            rows: Row ids per image.
            later: Per image, the rows of later rounds that may fill the last forward.
        """
        done = self.done.setdefault(model, {})
        items = [(i, r) for i in who for r in rows[i].tolist() if (i, r) not in done]
        if later is not None and items:  # fill the last forward with rows of later blocks
            spare = ((i, r) for i in who for block in later(i) for r in block.tolist() if (i, r) not in done)
            items += itertools.islice(spare, -len(items) % self.forward_rows)
        if items:
            index = torch.tensor([self.local[i] for i, _ in items])
            row_ids = torch.tensor([r for _, r in items])
            terms = self.est.packed_terms(unet, self.images, index, row_ids, self._noise_of(items), self.kwargs, self.forward_rows)
            done.update(zip(items, terms.tolist()))
            self.evaluated += len(items)
        return {i: torch.tensor([done[(i, r)] for r in rows[i].tolist()], dtype=torch.float32) for i in who}
