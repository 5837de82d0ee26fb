"""Kubernetes resource quantities, checked before they reach a pod."""

from __future__ import annotations

from decimal import Decimal

import pytest

from injector.mesh.quantity import parse_quantity


@pytest.mark.parametrize(("text", "value"), [
    ("100m", Decimal("0.1")), ("2", Decimal(2)), ("1Gi", Decimal(2**30)), ("128Mi", Decimal(2**27)),
    ("1k", Decimal(1000)), ("2e3", Decimal(2000)), (".5", Decimal("0.5")), (" 4 ", Decimal(4)),
])
def test_kubernetes_quantities_are_read_in_base_units(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "m", "1.2.3", "10 Mi", "1mi", "1KB", "-1", "abc", "1Gi "
                                  "extra"])
def test_what_kubernetes_would_refuse_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="resource quantity"):
        parse_quantity(text)


@pytest.mark.parametrize("text", [
    "\uff11\uff10\uff10m",  # fullwidth digits: Python's \d takes them, Kubernetes does not
    "\u0661\u0660\u0660m",  # Arabic-Indic digits
    "1e\u0663", "1.\uff15Gi", "\u00b2", "100m\n5",
])
def test_only_ascii_digits_make_a_quantity(text: str) -> None:
    with pytest.raises(ValueError, match="resource quantity"):
        parse_quantity(text)


@pytest.mark.parametrize(("text", "value"), [
    ("+1", Decimal(1)), ("1.", Decimal(1)), ("1.5e3", Decimal(1500)), ("-0", Decimal(0)),
    ("1E", Decimal(10) ** 18), ("2e-3", Decimal("0.002")),
])
def test_the_rest_of_kubernetes_grammar_is_read(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["1e999999999", "9" * 60 + "Ei", "1e-999999999"])
def test_extreme_exponents_are_values_not_crashes(text: str) -> None:
    # decimal.Overflow is an ArithmeticError, not a ValueError: it used to escape as a 500.
    assert parse_quantity(text) >= 0


@pytest.mark.parametrize("text", ["1e" + "9" * 40, "1" * 65])
def test_a_quantity_past_the_cap_is_refused_as_one(text: str) -> None:
    with pytest.raises(ValueError, match="resource quantity"):
        parse_quantity(text)


@pytest.mark.parametrize("value", [None, 100, ["1"]])
def test_a_non_string_is_refused_as_a_quantity(value: object) -> None:
    with pytest.raises(ValueError, match="resource quantity"):
        parse_quantity(value)  # type: ignore[arg-type]
