"""The walk of one query over its grid: the full grid at once, or the adaptive walk in stratified
blocks that drops trailing groups and brings them back (docs/method.md#the-adaptive-walk).

:class:`QueryWalk` only keeps the books: which rows each round holds, the terms seen so far, the
block estimates and the groups still in contention. The scorer runs the models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .result import mean_and_stderr

ADAPTIVE_FORWARD_ROWS = 64  # rows per adaptive forward at most (fixed, so bits do not depend on the batch or the block size)
ADAPTIVE_HEAD = 0.08  # share of the grid, least noisy first, walked exactly before the blocks (docs/results.md#smaller-blocks)
ADAPTIVE_BLOCK = 4  # rows per block of the adaptive walk (docs/results.md#smaller-blocks)


def stratified_walk(num_rows: int, strata: int, seed: int, head: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """An adaptive walk over the grid: the ``head`` least-noisy rows first, then blocks holding one row
    from each of ``strata`` timestep ranges of the other rows.

    The grid is least noisy first (t-major for DDPM, log-SNR-major for flow matching). Its first rows
    carry the largest ELBO weights, and so most of the spread of a group's row differences; walking
    them exactly leaves the blocks a low-variance remainder to estimate.

    The remaining rows are cut into ``strata`` contiguous ranges; each range is shuffled (``seed``)
    and block ``j`` takes the ``j``-th row of every range. A complete block's weighted sum
    ``Σ (range size / num_rows) · d_row`` is an unbiased estimate of those rows' share of the grid
    mean, and its variance excludes the large differences between timesteps, so few blocks separate
    the groups.

    Args:
        num_rows: Rows of the grid.
        strata: Timestep ranges (rows per complete block).
        seed: Seed of the shuffles.
        head: Least-noisy rows walked first, as one round (0: none).

    Returns:
        The rounds (row ids) and, per round, the rows' weights: ``1 / num_rows`` each for the head,
        the ranges' shares for a complete block, ``None`` for the last, incomplete blocks.
    """
    generator = torch.Generator().manual_seed(seed)
    rest = torch.arange(head, num_rows)
    ranges = [part[torch.randperm(len(part), generator=generator)] for part in rest.tensor_split(strata)]
    blocks, weights = ([torch.arange(head)], [torch.full((head,), 1 / num_rows)]) if head else ([], [])
    for j in range(max(len(part) for part in ranges)):
        members = [part for part in ranges if j < len(part)]
        blocks.append(torch.stack([part[j] for part in members]))
        complete = len(members) == len(ranges)
        weights.append(torch.tensor([len(part) / num_rows for part in members]) if complete else None)
    return blocks, weights


def survivors(alive: list[int], estimates: list[torch.Tensor], z: float) -> list[int]:
    """The groups still in contention: those whose gap to the leader is within ``z`` standard errors.

    Args:
        alive: The groups in contention so far.
        estimates: ``estimates[a]`` holds group ``alive[a]``'s block estimates of its score difference,
            on the same blocks for every group still alive, so gaps are paired.
        z: How many standard errors of the paired gap drop a group.
    """
    if len(alive) < 2:
        return alive
    d = torch.stack(estimates)
    leader = int(d.mean(1).argmax())
    gaps = d[leader] - d
    bound = z * gaps.std(dim=1) / math.sqrt(d.shape[1])
    return [g for a, g in enumerate(alive) if a == leader or not gaps[a].mean() > bound[a]]


@dataclass(frozen=True)
class AdaptiveSettings:
    """How every query of a scoring run walks its grid adaptively.

    Args:
        z: Standard errors of the paired gap that drop a group.
        block: Rows per stratified block.
        head: Least-noisy rows walked exactly before the blocks.
    """

    z: float
    block: int
    head: int

    def walk(self, num_rows: int, num_groups: int, seed: int) -> "QueryWalk":
        """The walk of one query, its block order drawn from ``seed``."""
        return QueryWalk.stratified(num_rows, num_groups, self.block, seed, self.z, self.head)


class QueryWalk:
    """One query's rounds of rows and what the models gave on them.

    Args:
        blocks: Row ids of each round.
        weights: Per round, the stratum weights of its rows (``None``: no block estimate is taken).
        num_groups: K.
        z: Standard errors of the paired gap that drop a group (``None``: the full grid).
        exact_rounds: The first rounds, walked by every model, whose weighted sum is an exact part of
            the grid mean (the head of :func:`stratified_walk`); every block estimate adds it.
    """

    def __init__(self, blocks: list[torch.Tensor], weights: list[torch.Tensor | None], num_groups: int, z: float | None,
                 exact_rounds: int = 0):
        self.blocks, self.weights, self.z, self.exact_rounds = blocks, weights, z, exact_rounds
        self.num_groups = k = num_groups
        self.base: list[torch.Tensor] = []  # the full model's terms, per round
        self.diffs: list[list[torch.Tensor]] = [[] for _ in range(k)]  # paired differences, per group and round
        self.exact = [torch.zeros(()) for _ in range(k + 1)]  # the exact rounds' part of the grid mean; index k: the base
        self.estimates: list[list[torch.Tensor]] = [[] for _ in range(k + 1)]  # block estimates; index k: the base
        self.alive = list(range(k))

    @classmethod
    def full_grid(cls, num_rows: int, num_groups: int) -> "QueryWalk":
        """Every row in one round, every group to the end."""
        return cls([torch.arange(num_rows)], [None], num_groups, None)

    @classmethod
    def stratified(cls, num_rows: int, num_groups: int, strata: int, seed: int, z: float, head: int = 0) -> "QueryWalk":
        """The adaptive walk of :func:`stratified_walk`, dropping groups ``z`` standard errors behind."""
        return cls(*stratified_walk(num_rows, strata, seed, head), num_groups, z, exact_rounds=1 if head else 0)

    def later(self, step: int) -> list[torch.Tensor]:
        """The rounds after ``step`` (their rows may fill the room left in a forward)."""
        return self.blocks[step + 1 :]

    def record(self, step: int, base: torch.Tensor, terms: dict[int, torch.Tensor]) -> list[int]:
        """Take round ``step``'s terms (the base's and those of ``terms``' groups, the ones alive).

        Returns:
            The dropped groups whose frozen estimate now beats the leader's: they must walk the
            rounds they missed (:meth:`catch_up`) and be compared again (:meth:`readmit`), so the
            top group is always one that walked as far as the query did.
        """
        self.base.append(base)
        for j, group_terms in terms.items():
            self.diffs[j].append(group_terms - base)
        weights, k = self.weights[step], self.num_groups
        if weights is None:  # not a complete block: one row from every stratum
            return []
        self._take(k, step, base)
        for j in self.alive:
            self._take(j, step, self.diffs[j][-1])
        if step < self.exact_rounds or len(self.estimates[k]) < 2:
            return []
        self._compare()
        means = [torch.stack(b).mean() for b in self.estimates[:k]]
        return [j for j in range(k) if j not in self.alive and means[j] >= max(means[a] for a in self.alive)]

    def missed(self, group: int, step: int) -> range:
        """The rounds up to ``step`` that ``group`` has not walked."""
        return range(len(self.diffs[group]), step + 1)

    def catch_up(self, group: int, rounds: range, terms: torch.Tensor) -> None:
        """Take ``group``'s terms on the missed ``rounds`` (their rows concatenated)."""
        for m, t in zip(rounds, terms.split([len(self.blocks[m]) for m in rounds])):
            self.diffs[group].append(t - self.base[m])
            if self.weights[m] is not None:
                self._take(group, m, self.diffs[group][-1])

    def readmit(self, groups: list[int]) -> None:
        """Put caught-up ``groups`` back in contention and compare again."""
        self.alive = sorted(self.alive + groups)
        self._compare()

    def goes_on(self, step: int) -> bool:
        """Whether the query walks another round after ``step``."""
        return step + 1 < len(self.blocks) and len(self.alive) > 1

    def _take(self, index: int, step: int, values: torch.Tensor) -> None:
        """Add round ``step``'s weighted ``values`` to model ``index``'s exact part or block estimates."""
        part = (self.weights[step] * values).sum()
        if step < self.exact_rounds:
            self.exact[index] = self.exact[index] + part
        else:
            self.estimates[index].append(self.exact[index] + part)

    def _compare(self) -> None:
        self.alive = survivors(self.alive, [torch.stack(self.estimates[j]) for j in self.alive], self.z)

    def result(self, num_rows: int, scale: float) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
        """The full model's -ELBO, each group's ``(score, stderr)`` and the rows each group walked.

        A group that walked the whole grid gets its plain mean; one dropped early, the mean of its
        stratified block estimates.
        """
        k = self.num_groups
        base_rows = torch.cat(self.base)
        neg_elbo = scale * (base_rows.mean() if len(base_rows) == num_rows else torch.stack(self.estimates[k]).mean())
        scores, rows_used = [], []
        for j in range(k):
            d = torch.cat(self.diffs[j])
            rows_used.append(len(d))
            sample = d if len(d) == num_rows else torch.stack(self.estimates[j])
            scores.append(mean_and_stderr(sample, scale))
        return neg_elbo, scores, rows_used
