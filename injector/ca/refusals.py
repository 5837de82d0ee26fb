"""Why the CA will not sign, in terms every transport can translate.

The CA is reached over HTTPS today and over Istio's gRPC protocol next; each says "no" in its own
vocabulary (an HTTP status, a gRPC code). So the CA's core and service refuse with a `kind` (what
the caller can do about it) and a `reason` (the metric label, stable across transports), and each
transport maps kinds to its own answers in one table.
"""

from __future__ import annotations

import enum

from injector.errors import InjectorError


class RefusalKind(enum.Enum):
    """What a refused caller can do about it; every transport maps each kind to an answer."""

    UNAUTHENTICATED = "unauthenticated"  # no credential, or one the CA does not know
    FORBIDDEN = "forbidden"  # a known caller asking for what is not theirs
    INVALID = "invalid"  # a request that cannot be signed as it is; retrying will not help
    EXHAUSTED = "exhausted"  # over the caller's rate: retry after `retry_after_seconds`
    UNAVAILABLE = "unavailable"  # the CA cannot decide or sign now: retry later


class Refusal(InjectorError):
    """The CA will not sign this request.

    `reason` is the label of `injector_ca_refusals_total` (bad_csr, weak_key, bad_token, ...);
    `message` is one line for the caller, never holding a token or a key;
    `retry_after_seconds`, when set, is when trying again may succeed.
    """

    def __init__(self, kind: RefusalKind, reason: str, message: str,
                 retry_after_seconds: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.message = message
        self.retry_after_seconds = retry_after_seconds

    def __repr__(self) -> str:
        return f"Refusal({self.kind.name}, {self.reason!r}, {self.message!r})"
