"""Token buckets by key: how many certificate requests an identity may make, and when next;
and how many failed authentications a client may have.

Pure: the clock is passed in, so the limiter is exact under test and free of sleeps.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    """`burst` requests at once per key, refilled at `rate` per second."""

    def __init__(self, rate: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, key: str) -> int | None:
        """Take one request for `key`: None if allowed, else whole seconds until it would be."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - at) * self._rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                if len(self._buckets) > 10_000:
                    self._forget_full(now)
                return None
            self._buckets[key] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self._rate))

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold no information, and keys are unbounded."""
        full_after = self._burst / self._rate
        self._buckets = {key: bucket for key, bucket in self._buckets.items()
                         if now - bucket[1] < full_after}


class FailureBudget:
    """How many failed authentications a client (a peer address) may have: `burst` at once,
    earned back at `rate` per second. Only counting, never sleeping: the caller decides what a
    spent budget costs (the CA: no more TokenReviews for that peer until it refills).

    At most `max_clients` are remembered, the least recently failing forgotten first (a
    forgotten client starts again with a full budget)."""

    def __init__(self, rate: float, burst: int, *, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be positive, burst and max_clients at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._max_clients = max_clients
        self._clock = clock
        self._remaining: dict[str, tuple[float, float]] = {}  # client -> (failures left, at)
        self._lock = threading.Lock()

    def _left(self, client: str, now: float) -> float:
        left, at = self._remaining.get(client, (self._burst, now))
        return min(self._burst, left + (now - at) * self._rate)

    def exhausted(self, client: str) -> int | None:
        """None while `client` may fail again; else whole seconds until it may."""
        now = self._clock()
        with self._lock:
            left = self._left(client, now)
        if left >= 1:
            return None
        return max(1, math.ceil((1 - left) / self._rate))

    def record_failure(self, client: str) -> bool:
        """Count one failure; True when this one spent the last of the budget."""
        now = self._clock()
        with self._lock:
            before = self._left(client, now)
            left = max(0.0, before - 1)
            self._remaining.pop(client, None)  # re-inserted last: the most recent
            self._remaining[client] = (left, now)
            while len(self._remaining) > self._max_clients:
                del self._remaining[next(iter(self._remaining))]
        return before >= 1 > left
