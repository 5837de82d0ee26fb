"""Kubernetes resource quantities (`100m`, `1Gi`, `2e3`), checked before they reach a pod.

The grammar is Kubernetes' own (apimachinery's `resource.ParseQuantity`), to the character:

    quantity  ::= sign? number suffix
    number    ::= digits | digits "." digits? | "." digits     (digits: ASCII 0-9 only)
    suffix    ::= "" | "m" | "k" | "M" | "G" | "T" | "P" | "E"
                | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
                | ("e" | "E") sign? digits

Python's `\\d` and `str.isdigit` also accept other scripts' digits (a fullwidth "100m": U+FF11
U+FF10 U+FF10 "m"), which Kubernetes refuses when it decodes the patched pod; so every digit
here is spelled `[0-9]`. Surrounding ASCII blanks are forgiven (the caller keeps the stripped
text, which is what a pod gets).
"""

from __future__ import annotations

import re
from decimal import MAX_EMAX, MIN_EMIN, Decimal, InvalidOperation, localcontext

# Longer than any quantity a person writes ("1.5Gi", "2000m", "1e3"), short enough that no
# quantity costs more than a glance to check: a cap of ours, not Kubernetes'.
MAX_QUANTITY_CHARS = 64

_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}
_QUANTITY = re.compile(
    r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|[mkMGTPE]))?"
)
_BLANKS = " \t\r\n"


def parse_quantity(text: str) -> Decimal:
    """The value of a quantity in base units; ValueError if Kubernetes would refuse it (or it is
    negative, or longer than MAX_QUANTITY_CHARS)."""
    if not isinstance(text, str):
        raise ValueError(f"not a resource quantity: {text!r}")
    stripped = text.strip(_BLANKS)
    if len(stripped) > MAX_QUANTITY_CHARS:
        raise ValueError(f"not a resource quantity: longer than {MAX_QUANTITY_CHARS} characters")
    match = _QUANTITY.fullmatch(stripped)
    if match is None:
        raise ValueError(f"not a resource quantity: {text!r}")
    number, exponent, suffix = match.groups()
    # Exact arithmetic whatever the exponent ("1e999999999" must compare, not overflow).
    with localcontext() as context:
        context.prec = 2 * MAX_QUANTITY_CHARS
        context.Emax = MAX_EMAX
        context.Emin = MIN_EMIN
        try:
            value = Decimal(number + (exponent or "")) * _SUFFIXES[suffix or ""]
        except (InvalidOperation, ArithmeticError):
            raise ValueError(f"not a resource quantity: {text!r}") from None
    if value < 0:
        raise ValueError(f"negative resource quantity: {text!r}")
    return value
