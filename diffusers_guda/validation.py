"""Type checks of settings read from JSON (recipes, manifests) or given in code: one home for the rules.

JSON has no integer type of its own and Python's ``bool`` is an ``int``, so a recipe's ``"steps": 1.5``,
``"seed": "0"`` or ``"rank": true`` would slip through a dataclass. These checks name the field and
what it must be.
"""

from __future__ import annotations

import numbers

from .errors import ConfigError

KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def kind_of(default) -> type | None:
    """The kind of value (``bool``, ``int``, ``float`` or ``str``) a setting with this default takes; ``None``: not checked."""
    return next((kind for kind in KIND_NAMES if isinstance(default, kind)), None)


def is_kind(value, kind: type) -> bool:
    """Whether ``value`` is of ``kind``; an integer is a valid number, a bool is neither."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    number = {int: numbers.Integral, float: numbers.Real}.get(kind, kind)
    return isinstance(value, number)


def check_types(config, ints=(), reals=()) -> None:
    """Refuse settings of the wrong type (a recipe's ``"steps": "ten"``, ``1.5`` or ``true``), naming the field.

    Args:
        config: A settings dataclass.
        ints: Fields that must be integers (or ``None``).
        reals: Fields that must be numbers (or ``None``).

    Raises:
        ConfigError: naming the first field of the wrong type.
    """
    for names, kind in ((ints, int), (reals, float)):
        for name in names:
            value = getattr(config, name)
            if value is not None and not is_kind(value, kind):
                raise ConfigError(f"{type(config).__name__}.{name} must be {KIND_NAMES[kind]}, got {value!r}.")
