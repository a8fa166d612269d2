"""Named evaluation benchmarks: grouped datasets built deterministically from embedded data."""

from __future__ import annotations

from typing import Callable

from ..data import GroupedDataset, load_digits
from ..errors import ConfigError

_BENCHMARKS: dict[str, tuple[Callable[[], GroupedDataset], str]] = {
    "digits-classes": (load_digits, "scikit-learn digits, groups = the 10 digit classes (easy for similarity: see DESIGN §3)"),
}


def available_benchmarks() -> dict[str, str]:
    """Benchmark name -> one-line description."""
    return {name: description for name, (_, description) in _BENCHMARKS.items()}


def load_benchmark(name: str) -> GroupedDataset:
    """The grouped training set of a named benchmark.

    Raises:
        ConfigError: for an unknown name (the message lists the known ones).
    """
    if name not in _BENCHMARKS:
        raise ConfigError(f"Unknown benchmark {name!r}; available: {', '.join(sorted(_BENCHMARKS))}. Or pass --data DIR.")
    return _BENCHMARKS[name][0]()
