"""Tests of diffusers_guda.validation: the type rules of settings read from JSON."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from diffusers_guda.errors import ConfigError
from diffusers_guda.validation import check_types, is_kind, kind_of


@pytest.mark.parametrize("value, kind, expected", [
    (3, int, True), (3.0, int, False), (True, int, False), ("3", int, False),
    (3, float, True), (2.5, float, True), (False, float, False),
    (True, bool, True), (1, bool, False), ("x", str, True),
])
def test_an_integer_is_a_number_and_a_bool_is_neither(value, kind, expected):
    assert is_kind(value, kind) is expected


def test_the_kind_of_a_default():
    assert [kind_of(d) for d in (True, 3, 0.5, "awss", None, [1])] == [bool, int, float, str, None, None]


def test_check_types_names_the_first_field_of_the_wrong_type():
    @dataclass
    class Settings:
        steps: int = 1
        rate: float = 0.1
        limit: int | None = None

    check_types(Settings(steps=2, rate=1), ints=("steps", "limit"), reals=("rate",))  # an int is a valid number
    with pytest.raises(ConfigError, match=r"Settings.steps must be an integer, got 1.5"):
        check_types(Settings(steps=1.5), ints=("steps",))
    with pytest.raises(ConfigError, match=r"Settings.rate must be a number, got '0.1'"):
        check_types(Settings(rate="0.1"), reals=("rate",))
