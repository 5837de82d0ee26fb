"""One request to the CA for the pod's SVID (`POST /v1/certificates`), and what to do next.

Every way the request can fail (the token unreadable, the CA's root unloadable, the CA out of
reach, a refusal, an unusable answer) becomes one log line and a delay before the next attempt,
never an exception: the agent keeps asking until it is stopped. The token goes only into the
Authorization header, never into a log line.
"""

from __future__ import annotations

import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from injector.proxy.ca_address import CaAddress
from injector.proxy.renewal import REFUSAL_MIN_DELAY, Backoff
from injector.proxy.svid import Issued, new_key_and_csr, parse_issued

# The agent's one logger: its lines read as one process's, whichever module writes them.
log = logging.getLogger("injector.agent")

CA_REQUEST_TIMEOUT = 5.0
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
class CaClient:
    """What a certificate request needs: where the CA is, how to trust it, who we are."""

    ca: CaAddress
    token_file: Path  # re-read at every request: the kubelet rotates the token
    ca_root_file: Path
    trust_domain: str
    spiffe_id: str | None  # the identity the CSR names; None when the pod's names are unknown
    ttl_seconds: int | None  # None: the CA's default lifetime

    def request_certificate(self, backoff: Backoff) -> Attempt:
        """One `POST /v1/certificates`; every failure is one log line saying what and when
        next."""
        import httpx  # on first use: a command that stops at a bad setting never loads it

        url = self.ca.certificates_url
        try:
            token = usable_token(self.token_file.read_text(encoding="utf-8", errors="replace"))
        except OSError as error:
            delay = backoff.next_delay(REFUSAL_MIN_DELAY)
            log.error("cannot read the token file %s: %s; retrying in %.1fs", self.token_file,
                      error.strerror, delay)
            return Attempt(retry_in=delay)
        if token is None:
            delay = backoff.next_delay(REFUSAL_MIN_DELAY)
            log.error("the token file %s holds no usable token (empty, or not a single line of "
                      "printable ASCII); retrying in %.1fs", self.token_file, delay)
            return Attempt(retry_in=delay)
        try:
            context = ssl.create_default_context(cafile=str(self.ca_root_file))
        except (OSError, ssl.SSLError) as error:
            delay = backoff.next_delay(REFUSAL_MIN_DELAY)
            log.error("cannot load the CA root %s: %s; retrying in %.1fs", self.ca_root_file,
                      error, delay)
            return Attempt(retry_in=delay)
        request = new_key_and_csr(self.spiffe_id)
        body: dict[str, Any] = {"csr": request.csr_pem}
        if self.ttl_seconds is not None:
            body["ttl_seconds"] = self.ttl_seconds
        try:
            with httpx.Client(verify=context, timeout=CA_REQUEST_TIMEOUT) as client:
                response = client.post(url, json=body,
                                       headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as error:
            delay = backoff.next_delay()
            log.warning("the CA at %s is unreachable (%s: %s); not ready, retrying in %.1fs",
                        url, type(error).__name__, error or "no detail", delay)
            return Attempt(retry_in=delay)
        if response.status_code != 200:
            reason = refusal_reason(response.status_code, response.content)
            if response.status_code in REFUSED_STATUSES:
                delay = backoff.next_delay(REFUSAL_MIN_DELAY)
                log.error("the CA refused the certificate request: %s; retrying in %.1fs",
                          reason, delay)
            else:
                delay = backoff.next_delay(
                    retry_after_seconds(response.headers.get("retry-after")))
                log.warning("the CA could not sign now: %s; retrying in %.1fs", reason, delay)
            return Attempt(retry_in=delay)
        try:
            issued = parse_issued(response.json(), request.key, self.trust_domain)
        except ValueError as error:  # UnusableAnswer, or a body that is not JSON
            delay = backoff.next_delay(REFUSAL_MIN_DELAY)
            log.error("the CA's answer is unusable: %s; retrying in %.1fs", error, delay)
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
