"""The per-identity CSR rate limit: the token bucket on a fake clock, then the 429s of a
real server, alone and shared by `serve --workers`."""

from __future__ import annotations

from pathlib import Path

import pytest

from injector.ca.ratelimit import FailureBudget, RateLimiter
from tests.support.certs import make_csr, p256, request_svid
from tests.support.servers import API_TOKEN, WEB_TOKEN, start_ca_server, stopped


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_budget_is_spent_then_earned_back_per_client() -> None:
    clock = Clock()
    budget = FailureBudget(rate=0.5, burst=3, clock=clock)
    assert budget.exhausted("10.0.0.7") is None
    assert [budget.record_failure("10.0.0.7") for _ in range(4)] == [False, False, True, False]
    assert budget.exhausted("10.0.0.7") == 2  # one failure more in 2 s
    assert budget.exhausted("10.0.0.8") is None  # every client has its own budget
    clock.now += 2
    assert budget.exhausted("10.0.0.7") is None


def test_a_failure_budget_remembers_a_bounded_number_of_clients() -> None:
    clock = Clock()
    budget = FailureBudget(rate=0.001, burst=1, max_clients=2, clock=clock)
    for client in ("a", "b", "c"):
        budget.record_failure(client)
    assert budget.exhausted("a") is None  # the least recent, forgotten: a full budget again
    assert budget.exhausted("b") and budget.exhausted("c")


def test_a_burst_then_the_refill_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.5, burst=3, clock=clock)
    assert [limiter.acquire("shop/web") for _ in range(3)] == [None, None, None]
    assert limiter.acquire("shop/web") == 2  # one token comes back in 2 s
    assert limiter.acquire("shop/api") is None  # every identity has its own bucket
    clock.now += 2
    assert limiter.acquire("shop/web") is None
    assert limiter.acquire("shop/web") == 2
    clock.now += 60
    assert [limiter.acquire("shop/web") for _ in range(4)] == [None, None, None, 2]


def test_refilled_buckets_are_forgotten_but_busy_ones_are_kept() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, clock=clock)
    for index in range(10_001):
        limiter.acquire(f"ns/sa-{index}")
    clock.now += 0.5
    limiter.acquire("ns/busy")  # triggers the clean-up of what has refilled
    assert limiter.acquire("ns/sa-10000") == 1  # still remembered: not refilled yet


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (1, 0)])
def test_nonsense_limits_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=rate, burst=burst)


def test_the_ca_answers_429_with_retry_after_per_identity(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path, "csrBurst: 2\ncsrRatePerSecond: 0.01\n")
    try:
        csr = make_csr(p256())
        with server.client() as client:
            assert [request_svid(client, WEB_TOKEN, csr).status_code for _ in range(2)] == [
                200, 200]
            limited = request_svid(client, WEB_TOKEN, csr)
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert "shop/web" in limited.json()["error"]
            assert request_svid(client, API_TOKEN, csr).status_code == 200
            metrics = client.get("/metrics").text
            assert 'injector_ca_refusals_total{reason="rate_limited"} 1.0' in metrics
    finally:
        server.stop()


def test_workers_share_the_limit_rather_than_multiply_it(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path, "csrBurst: 4\ncsrRatePerSecond: 0.01\nworkers: 2\n")
    try:
        csr = make_csr(p256())
        _, idle = server.workers(2)
        # All of one identity's requests reach one worker: it allows half the burst.
        with stopped([idle]):
            statuses = []
            for _ in range(4):
                with server.client() as client:
                    statuses.append(request_svid(client, WEB_TOKEN, csr).status_code)
        assert statuses == [200, 200, 429, 429]
    finally:
        server.stop()
