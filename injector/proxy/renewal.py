"""When the agent asks the CA again: renewal at half-life, and backoff after a failure.

Pure arithmetic, kept apart from the loop that sleeps on it (injector/proxy/agent.py) so the
schedule can be checked without waiting for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

RENEWAL_JITTER = 0.05  # renew up to 5 % of the lifetime before half-life
MIN_RENEWAL_DELAY = 1.0

# Refusals will not go away by asking again at once (a bad token, a forbidden identity): wait at
# least this long between such attempts.
REFUSAL_MIN_DELAY = 5.0


def renewal_delay(received_at: float, not_after: float, jitter: float) -> float:
    """Seconds from `received_at` until renewal: half the remaining life, counted from when we got
    the certificate (not from its backdated notBefore), less `jitter` (0..1) times 5 % of it,
    so a fleet started together does not renew in the same second. Never before 1 s: a
    certificate that is already past half-life (clock skew) is renewed soon, not in a loop."""
    if not 0.0 <= jitter <= 1.0:
        raise ValueError("jitter must be within 0..1")
    lifetime = max(0.0, not_after - received_at)
    return max(MIN_RENEWAL_DELAY, lifetime / 2 - jitter * RENEWAL_JITTER * lifetime)


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: `first`, doubling with every failure since the
    last success up to `cap`; `reset()` on success.

    A kind of failure may start from a longer delay than `first` (`start`: a refusal waits at
    least REFUSAL_MIN_DELAY, then doubles from there), and a delay the server asked for
    (Retry-After) is honoured as a `floor`, even beyond the cap. Jitter takes up to 20 % off,
    never below `start` or `floor`, so agents failing together do not retry in lockstep.
    """

    first: float = 0.5
    cap: float = 30.0
    random: Callable[[], float] = random.random
    attempts: int = 0

    def next_delay(self, floor: float = 0.0, *, start: float | None = None) -> float:
        least = self.first if start is None else start
        exponential = min(self.cap, least * 2.0 ** min(self.attempts, 32))
        self.attempts += 1
        jittered = exponential * (1 - 0.2 * self.random())
        return max(jittered, floor, 0.0 if start is None else min(start, self.cap))

    def reset(self) -> None:
        self.attempts = 0
