"""One request to the CA for the pod's SVID (`POST /v1/certificates`), and what to do next.

Every way the request can fail (the token unreadable, the CA's root unloadable, the CA out of
reach, a refusal, an unusable answer) becomes one log line and a delay before the next attempt,
never an exception: the agent keeps asking until it is stopped. The token goes only into the
Authorization header, never into a log line.

A request has a total deadline (a CA that sends one byte every few seconds is cut off, however
short each wait), reads at most MAX_ANSWER_BYTES, and is abandoned as soon as the agent is told
to stop: it runs on an event loop of its own, where all three are a cancellation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from injector.proxy.ca_address import CaAddress
from injector.proxy.renewal import REFUSAL_MIN_DELAY, Backoff
from injector.proxy.svid import Issued, UnusableAnswer, new_key_and_csr, parse_issued

# The agent's one logger: its lines read as one process's, whichever module writes them.
log = logging.getLogger("injector.agent")

# Each connect, read and write may take this long; the whole request CA_REQUEST_DEADLINE.
CA_REQUEST_TIMEOUT: Final = 5.0
CA_REQUEST_DEADLINE: Final = 10.0
# An answer is a few certificates: more than this is not one, and is not read further.
MAX_ANSWER_BYTES: Final = 1024 * 1024
# How often a request in flight looks at the stop request.
STOP_POLL_SECONDS: Final = 0.05
CANCEL_GRACE_SECONDS: Final = 0.5
MAX_RETRY_AFTER = 300.0
# Statuses that say the request itself is wrong (the token, the identity, the CSR): asking again
# at once would only be refused again.
REFUSED_STATUSES = (400, 401, 403, 413)


@dataclass(frozen=True)
class Attempt:
    """One request's outcome: the SVID and its key, or how long to wait before the next."""

    issued: Issued | None = None
    key_pem: str = ""
    retry_in: float = 0.0


@dataclass(frozen=True)
class Answer:
    """The CA's HTTP answer, read whole (and bounded)."""

    status: int
    retry_after: str | None
    body: bytes


class AnswerTooLarge(Exception):
    """The CA sent more than MAX_ANSWER_BYTES."""


class Abandoned(Exception):
    """The request ended before its answer: `why` says whether the deadline or a stop."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def run_abandonable(work: Coroutine[Any, Any, Answer], deadline_seconds: float,
                    stop: threading.Event | None) -> Answer:
    """Run `work` on an event loop of its own until it ends, the deadline passes or `stop` is
    set (looked at every STOP_POLL_SECONDS): Abandoned for the last two, its connection closed.

    A loop of its own, closed without waiting for its executor's threads, so that nothing (not
    even a name lookup that hangs) can keep the agent past its deadline or its stop."""

    async def watched() -> Answer:
        task = asyncio.ensure_future(work)
        try:
            async with asyncio.timeout(deadline_seconds):
                while True:
                    done, _ = await asyncio.wait({task}, timeout=STOP_POLL_SECONDS)
                    if done:
                        return task.result()
                    if stop is not None and stop.is_set():
                        raise Abandoned("stopped")
        except TimeoutError:
            if task.done() and not task.cancelled() and task.exception() is None:
                return task.result()
            raise Abandoned(f"no whole answer within {deadline_seconds:g}s") from None
        finally:
            if not task.done():
                task.cancel()  # closes its connection; given a moment, never more
                await asyncio.wait({task}, timeout=CANCEL_GRACE_SECONDS)

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(watched())
    finally:
        # The response's byte stream is an async generator: closed here, within a moment.
        loop.run_until_complete(asyncio.wait({loop.create_task(loop.shutdown_asyncgens())},
                                             timeout=CANCEL_GRACE_SECONDS))
        loop.close()


async def _post(url: str, body: dict[str, Any], token: str, context: ssl.SSLContext) -> Answer:
    import httpx  # on first use: a command that stops at a bad setting never loads it

    # Uncompressed only (raw bytes are what is bounded): a small gzip body can be a huge one.
    headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"}
    async with (httpx.AsyncClient(verify=context, timeout=CA_REQUEST_TIMEOUT) as client,
                client.stream("POST", url, json=body, headers=headers) as response):
        content = bytearray()
        async for chunk in response.aiter_raw():
            content += chunk
            if len(content) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
        return Answer(response.status_code, response.headers.get("retry-after"),
                      bytes(content))


@dataclass(frozen=True)
class CaClient:
    """What a certificate request needs: where the CA is, how to trust it, who we are."""

    ca: CaAddress
    token_file: Path  # re-read at every request: the kubelet rotates the token
    ca_root_file: Path
    trust_domain: str
    spiffe_id: str | None  # the identity the CSR names; None when the pod's names are unknown
    ttl_seconds: int | None  # None: the CA's default lifetime
    deadline_seconds: float = CA_REQUEST_DEADLINE

    def request_certificate(self, backoff: Backoff,
                            stop: threading.Event | None = None) -> Attempt:
        """One `POST /v1/certificates`, within `deadline_seconds` and abandoned once `stop` is
        set; every failure is one log line saying what and when next."""
        import httpx  # on first use: a command that stops at a bad setting never loads it

        url = self.ca.certificates_url
        try:
            token = usable_token(self.token_file.read_text(encoding="utf-8", errors="replace"))
        except OSError as error:
            delay = backoff.next_delay(start=REFUSAL_MIN_DELAY)
            log.error("cannot read the token file %s: %s; retrying in %.1fs", self.token_file,
                      error.strerror, delay)
            return Attempt(retry_in=delay)
        if token is None:
            delay = backoff.next_delay(start=REFUSAL_MIN_DELAY)
            log.error("the token file %s holds no usable token (empty, or not a single line of "
                      "printable ASCII); retrying in %.1fs", self.token_file, delay)
            return Attempt(retry_in=delay)
        try:
            context = ssl.create_default_context(cafile=str(self.ca_root_file))
        except (OSError, ssl.SSLError) as error:
            delay = backoff.next_delay(start=REFUSAL_MIN_DELAY)
            log.error("cannot load the CA root %s: %s; retrying in %.1fs", self.ca_root_file,
                      error, delay)
            return Attempt(retry_in=delay)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        request = new_key_and_csr(self.spiffe_id)
        body: dict[str, Any] = {"csr": request.csr_pem}
        if self.ttl_seconds is not None:
            body["ttl_seconds"] = self.ttl_seconds
        try:
            answer = run_abandonable(_post(url, body, token, context), self.deadline_seconds,
                                     stop)
        except Abandoned as abandoned:
            if abandoned.why == "stopped":
                log.info("the certificate request to %s was abandoned: stopping", url)
                return Attempt()
            delay = backoff.next_delay()
            log.warning("the CA at %s sent %s; not ready, retrying in %.1fs", url,
                        abandoned.why, delay)
            return Attempt(retry_in=delay)
        except AnswerTooLarge:
            delay = backoff.next_delay(start=REFUSAL_MIN_DELAY)
            log.error("the CA's answer is unusable: over %d bytes; retrying in %.1fs",
                      MAX_ANSWER_BYTES, delay)
            return Attempt(retry_in=delay)
        except (httpx.HTTPError, OSError) as error:  # OSError: whatever httpx did not wrap
            delay = backoff.next_delay()
            log.warning("the CA at %s is unreachable (%s: %s); not ready, retrying in %.1fs",
                        url, type(error).__name__, error or "no detail", delay)
            return Attempt(retry_in=delay)
        if answer.status != 200:
            reason = refusal_reason(answer.status, answer.body)
            if answer.status in REFUSED_STATUSES:
                delay = backoff.next_delay(start=REFUSAL_MIN_DELAY)
                log.error("the CA refused the certificate request: %s; retrying in %.1fs",
                          reason, delay)
            else:
                delay = backoff.next_delay(retry_after_seconds(answer.retry_after))
                log.warning("the CA could not sign now: %s; retrying in %.1fs", reason, delay)
            return Attempt(retry_in=delay)
        try:
            issued = parse_issued(json.loads(answer.body), request.key, self.trust_domain,
                                  spiffe_id=self.spiffe_id)
        except (ValueError, RecursionError) as error:  # UnusableAnswer, or not JSON
            delay = backoff.next_delay(start=REFUSAL_MIN_DELAY)
            log.error("the CA's answer is unusable: %s; retrying in %.1fs",
                      error if isinstance(error, UnusableAnswer) else "not a JSON document",
                      delay)
            return Attempt(retry_in=delay)
        backoff.reset()
        return Attempt(issued=issued, key_pem=request.key_pem)


def usable_token(text: str) -> str | None:
    """The token from the token file, or None when it cannot go into an Authorization header
    (empty, or characters a header may not hold): refused here, so no HTTP library ever puts
    the token into an error message that could be logged."""
    token = text.strip()
    if not token or not all(33 <= ord(char) < 127 for char in token):
        return None
    return token


def refusal_reason(status: int, body: bytes) -> str:
    """The CA's `{"error": ...}` reason for a refusal, in one line, else the status alone."""
    try:
        reason = json.loads(body).get("error")
    except (ValueError, AttributeError):
        reason = None
    if isinstance(reason, str) and reason.strip():
        return f"HTTP {status}: {' '.join(reason.split())[:300]}"
    return f"HTTP {status}"


def retry_after_seconds(header: str | None) -> float:
    """A Retry-After header in seconds (the CA sends seconds); 0 when absent or not a number."""
    if header is None:
        return 0.0
    try:
        return max(0.0, min(float(header.strip()), MAX_RETRY_AFTER))
    except ValueError:
        return 0.0
