"""Static tokens are answered on the event loop (issue 7), with the same answers as the worker
thread's path; anything that may do I/O still goes to the thread."""

from __future__ import annotations

import pytest

from injector.ca.authn import AuthenticatorChain, Caller, StaticTokens, token_digest
from injector.ca.ratelimit import RateLimiter
from injector.ca.refusals import Refusal, RefusalKind
from injector.ca.service import CAService
from tests.support.certs import self_signed_authority

WEB = Caller("shop", "web", "static")


class Blocking:
    """Stands for TokenReview: must never be called on the event loop's path."""

    name = "blocking"

    def __init__(self) -> None:
        self.calls = 0

    def authenticate(self, token: str) -> Caller | None:
        self.calls += 1
        return Caller("shop", "api", self.name) if token == "review-token" else None


def service(*authenticators: object, rate_limiter: RateLimiter | None = None) -> CAService:
    return CAService(self_signed_authority(),
                     AuthenticatorChain(authenticators),  # type: ignore[arg-type]
                     rate_limiter=rate_limiter)


def static() -> StaticTokens:
    return StaticTokens({token_digest("web-token"): WEB})


def test_a_static_token_is_answered_without_the_blocking_authenticator() -> None:
    blocking = Blocking()
    cas = service(static(), blocking)
    assert cas.authenticate_without_io("Bearer web-token") == WEB
    assert blocking.calls == 0


def test_a_token_only_io_can_decide_goes_to_the_thread() -> None:
    blocking = Blocking()
    cas = service(static(), blocking)
    assert cas.authenticate_without_io("Bearer review-token") is None
    assert blocking.calls == 0
    assert cas.authenticate("Bearer review-token") == Caller("shop", "api", "blocking")


@pytest.mark.parametrize("authenticators", ["static only", "none"])
def test_refusals_are_the_same_on_both_paths(authenticators: str) -> None:
    cas = service(static()) if authenticators == "static only" else service()
    for header, reason in (("Bearer nope", "bad_token"), (None, "no_token"),
                           ("Basic web-token", "no_token")):
        refusals = []
        for path in (cas.authenticate_without_io, cas.authenticate):
            with pytest.raises(Refusal) as refused:
                path(header)
            refusals.append((refused.value.kind, refused.value.reason))
        assert refusals == [(RefusalKind.UNAUTHENTICATED, reason)] * 2


def test_the_rate_limit_counts_once_per_request_on_either_path() -> None:
    cas = service(static(), Blocking(), rate_limiter=RateLimiter(0.001, 2))
    assert cas.authenticate_without_io("Bearer web-token") == WEB
    assert cas.authenticate("Bearer web-token") == WEB
    with pytest.raises(Refusal) as refused:
        cas.authenticate_without_io("Bearer web-token")
    assert refused.value.kind is RefusalKind.EXHAUSTED
