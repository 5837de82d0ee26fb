"""Token buckets by key: how many certificate requests an identity may make, and when next.

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
