"""Static tokens are answered on the event loop (issue 7), with the same answers as the worker
thread's path; anything that may do I/O still goes to the thread. A cached TokenReview answer is
answered on the event loop too, and a client over its failure budget costs no review (issue 13)."""

from __future__ import annotations

import pytest

from injector.ca.authn import (
    NEEDS_IO,
    Answer,
    AuthenticatorChain,
    Caller,
    StaticTokens,
    token_digest,
)
from injector.ca.ratelimit import FailureBudget, RateLimiter
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


def service(*authenticators: object, rate_limiter: RateLimiter | None = None,
            failure_budget: FailureBudget | None = None) -> CAService:
    return CAService(self_signed_authority(),
                     AuthenticatorChain(authenticators),  # type: ignore[arg-type]
                     rate_limiter=rate_limiter, failure_budget=failure_budget)


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


# --- a client that keeps failing (issue 13) -----------------------------------------------------

class Reviewing(Blocking):
    """Stands for TokenReview with its cache: knows the answers it gave, without I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.answered: dict[str, Caller | None] = {}

    def authenticate(self, token: str) -> Caller | None:
        self.answered[token] = super().authenticate(token)
        return self.answered[token]

    def answer_without_io(self, token: str) -> Answer:
        return self.answered.get(token, NEEDS_IO)


def test_a_client_over_its_failure_budget_costs_no_more_reviews() -> None:
    reviewing = Reviewing()
    cas = service(static(), reviewing, failure_budget=FailureBudget(rate=0.001, burst=3))
    for index in range(3):
        with pytest.raises(Refusal) as refused:
            cas.authenticate(f"Bearer junk-{index}", "10.1.1.1")
        assert refused.value.reason == "bad_token"
    assert reviewing.calls == 3
    for path in (cas.authenticate_without_io, cas.authenticate):
        with pytest.raises(Refusal) as refused:
            path("Bearer junk-new", "10.1.1.1")
        assert refused.value.kind is RefusalKind.EXHAUSTED
        assert refused.value.reason == "auth_failures"
        assert refused.value.retry_after_seconds and refused.value.retry_after_seconds > 0
    assert reviewing.calls == 3  # refused before the API server is asked
    # Answers known without I/O still come, for that client as for any other.
    assert cas.authenticate_without_io("Bearer web-token", "10.1.1.1") == WEB
    assert cas.authenticate("Bearer review-token", "10.2.2.2") == Caller("shop", "api",
                                                                         "blocking")
    assert cas.authenticate_without_io("Bearer review-token", "10.1.1.1") == Caller(
        "shop", "api", "blocking")  # reviewed a moment ago, for another client
    # Without a peer (a transport that does not know it), no budget applies.
    with pytest.raises(Refusal) as refused:
        cas.authenticate("Bearer junk-other")
    assert refused.value.reason == "bad_token"


def test_a_cached_answer_is_given_on_the_event_loops_path() -> None:
    reviewing = Reviewing()
    cas = service(static(), reviewing)
    assert cas.authenticate_without_io("Bearer review-token") is None  # not known yet
    assert cas.authenticate("Bearer review-token") == Caller("shop", "api", "blocking")
    with pytest.raises(Refusal):
        cas.authenticate("Bearer junk")
    calls = reviewing.calls
    assert cas.authenticate_without_io("Bearer review-token") == Caller("shop", "api",
                                                                         "blocking")
    with pytest.raises(Refusal) as refused:
        cas.authenticate_without_io("Bearer junk")  # known bad: no thread hop either
    assert refused.value.reason == "bad_token"
    assert reviewing.calls == calls
