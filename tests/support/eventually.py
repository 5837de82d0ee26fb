"""Waiting for something that happens in another process or thread: one helper, one message."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 15, *, interval: float = 0.05,
               what: str = "") -> T:
    """Call `check` until it returns something truthy, and return that; fail after `timeout`
    seconds with `what` (or the last value seen) in the message. An exception from `check`
    ends the wait at once: a check that cannot run is a failure, not a reason to wait."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or repr(result)}")
        time.sleep(interval)
