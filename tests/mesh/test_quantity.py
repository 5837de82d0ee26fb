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
