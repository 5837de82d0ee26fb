"""When the agent asks the CA again: half-life renewal with jitter, and capped backoff."""

from __future__ import annotations

import pytest

from injector.proxy.renewal import Backoff, renewal_delay


def test_renewal_is_at_half_life_counted_from_receipt() -> None:
    # A 24 h certificate received now: renew 12 h from now, whatever its (backdated) notBefore.
    assert renewal_delay(1000.0, 1000.0 + 86400, jitter=0.0) == 43200
    # Received late in its life (it was issued an hour ago): half of what remains.
    assert renewal_delay(5000.0, 5000.0 + 7200, jitter=0.0) == 3600


def test_jitter_renews_a_little_earlier_never_later() -> None:
    earliest = renewal_delay(0.0, 100.0, jitter=1.0)
    latest = renewal_delay(0.0, 100.0, jitter=0.0)
    assert latest == 50.0
    assert 44.0 <= earliest < latest
    with pytest.raises(ValueError):
        renewal_delay(0.0, 100.0, jitter=1.5)


def test_an_expired_or_skewed_certificate_is_renewed_soon_but_not_in_a_loop() -> None:
    assert renewal_delay(1000.0, 900.0, jitter=0.5) == 1.0
    assert renewal_delay(1000.0, 1001.0, jitter=0.0) == 1.0


def test_backoff_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(first=0.5, cap=4.0, random=lambda: 0.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_backoff_jitter_and_floor() -> None:
    backoff = Backoff(first=10.0, cap=30.0, random=lambda: 1.0)
    assert backoff.next_delay() == pytest.approx(8.0)  # up to 20 % less
    assert Backoff(first=0.5, random=lambda: 0.0).next_delay(floor=5.0) == 5.0
    # A server's Retry-After beyond the cap is still honoured.
    assert Backoff(first=0.5, cap=30.0, random=lambda: 0.0).next_delay(floor=60.0) == 60.0


def test_a_refusal_starts_longer_and_doubles_from_there_jittered_but_never_below() -> None:
    # Issue 13: an unusable answer was asked for again every second, in lockstep.
    never = Backoff(first=0.5, cap=30.0, random=lambda: 0.0)
    assert [never.next_delay(start=5.0) for _ in range(5)] == [5.0, 10.0, 20.0, 30.0, 30.0]
    most = Backoff(first=0.5, cap=30.0, random=lambda: 1.0)
    assert [most.next_delay(start=5.0) for _ in range(4)] == [5.0, 8.0, 16.0, 24.0]
    # Spread: agents refused together do not come back together.
    spread = {Backoff(random=lambda value=value: value, attempts=3).next_delay(start=5.0)
              for value in (0.0, 0.5, 1.0)}
    assert spread == {30.0, 27.0, 24.0}
