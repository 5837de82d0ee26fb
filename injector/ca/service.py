"""The CA as a service, whatever the transport: who is asking, how often, and what they get.

A transport (HTTPS today, Istio's gRPC protocol next) reads a request, then asks this service to
authenticate the bearer token (the authenticator chain: static tokens, then TokenReview), to
admit the caller under its per-identity rate, and to sign the CSR for the caller's SPIFFE ID.
Every "no" is a `Refusal` with a kind; the transport alone turns kinds into its statuses. The
service also keeps the CA's metrics, so that every transport counts into the same series, and
`build_ca_service` assembles it from the certificates directory and the settings.

Tokens, keys and CSR bodies are never logged; every issuance is one log line.

A client address (the transport's peer) that keeps failing to authenticate spends its failure
budget; once spent, its tokens that only a TokenReview could check are refused (429) without
asking the API server, until the budget refills. Answers known without I/O (static tokens,
cached reviews) are never held back by it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from prometheus_client import Counter, Gauge, Histogram

from injector.ca import certsdir
from injector.ca.authn import (
    NEEDS_IO,
    AuthenticationUnavailable,
    Authenticator,
    AuthenticatorChain,
    Caller,
    Rejected,
    StaticTokens,
    TokenFileError,
    TokenReviewAuthenticator,
    TokenReviewer,
)
from injector.ca.authority import (
    DEFAULT_POLICY,
    Authority,
    IssuedSvid,
    SigningPolicy,
    rfc3339,
    sign_svid,
)
from injector.ca.ratelimit import FailureBudget, RateLimiter
from injector.ca.refusals import Refusal, RefusalKind
from injector.errors import ConfigError
from injector.mesh.config import MeshConfig
from injector.mesh.spiffe import SpiffeId, SpiffeIdError

# What a caller is told to wait when the CA cannot sign now and has no better estimate.
RETRY_AFTER_SECONDS: Final = 5
# Failed authentications a client address may have before its unknown tokens are no longer
# sent to the API server: this many at once, then one more every 2 s (per serve process:
# divided among `serve --workers`).
AUTH_FAILURE_BURST: Final = 10
AUTH_FAILURE_RATE: Final = 0.5
# Refusals a flood would repeat for every request: counted, not logged one by one (what caused
# them is logged once, where it starts).
UNLOGGED_REASONS: Final = frozenset({"auth_failures", "tokenreview_busy"})

log = logging.getLogger("injector.ca")

CSRS_RECEIVED = Counter("injector_ca_csr_received", "Certificate requests received")
CERTIFICATES_ISSUED = Counter("injector_ca_certificates_issued", "X509-SVIDs issued")
REFUSALS = Counter("injector_ca_refusals", "Certificate requests refused, by reason",
                   ["reason"])
SIGNING_SECONDS = Histogram(
    "injector_ca_signing_duration_seconds",
    "Time to check a CSR and sign its SVID (authentication excluded)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
# Every worker of `serve --workers` sets the same value: /metrics shows one.
ROOT_EXPIRY = Gauge("injector_ca_root_expiry_timestamp_seconds",
                    "When the root certificate the signing CA chains to expires (Unix time)",
                    multiprocess_mode="max")
SIGNING_CA_EXPIRY = Gauge("injector_ca_signing_ca_expiry_timestamp_seconds",
                          "When the signing CA certificate expires (Unix time)",
                          multiprocess_mode="max")


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CAService:
    """The CA's state and decisions: authenticate, admit, sign. No transport here."""

    def __init__(self, authority: Authority, authenticator: AuthenticatorChain, *,
                 policy: SigningPolicy = DEFAULT_POLICY,
                 clock: Callable[[], dt.datetime] = _utcnow,
                 rate_limiter: RateLimiter | None = None,
                 failure_budget: FailureBudget | None = None) -> None:
        self.authority = authority
        self.authenticator = authenticator
        self.policy = policy
        self._rate_limiter = rate_limiter
        self._failure_budget = failure_budget or FailureBudget(AUTH_FAILURE_RATE,
                                                               AUTH_FAILURE_BURST)
        self._clock = clock
        ROOT_EXPIRY.set(authority.root_not_after.timestamp())
        SIGNING_CA_EXPIRY.set(authority.signing_cert.not_valid_after_utc.timestamp())

    async def watch_token_file(self, interval_seconds: float = 2.0) -> None:
        """Reload the static token file when it changes (a background task of serve)."""
        while True:
            await asyncio.sleep(interval_seconds)
            self.authenticator.reload_if_changed()

    def readiness(self) -> str | None:
        """None when the CA can sign; otherwise why it cannot (for /readyz)."""
        if self.authority.expired(self._clock()):
            return f"the signing CA expired at {rfc3339(self.authority.not_after)}"
        return None

    def trust_bundle_pem(self) -> str:
        return "".join(self.authority.trust_bundle_pems)

    def authenticate(self, authorization: str | None, peer: str | None = None) -> Caller:
        """The caller behind an `authorization` value ("Bearer <token>", as an HTTP header or
        gRPC metadata carries it), admitted under its rate; or Refusal. `peer` is the client's
        address as the transport saw it (None: unknown, no failure budget applies).

        Blocking (TokenReview): call from a worker thread."""
        token = bearer_token(authorization)
        answer = self.authenticator.answer_without_io(token)
        if answer is NEEDS_IO:
            self._within_failure_budget(peer)
            try:
                answer = self.authenticator.authenticate(token)
            except AuthenticationUnavailable as error:
                raise Refusal(RefusalKind.UNAVAILABLE, error.reason,
                              f"cannot authenticate now: {error}",
                              error.retry_after_seconds) from None
        return self._admit(answer, peer)

    def authenticate_without_io(self, authorization: str | None,
                                peer: str | None = None) -> Caller | None:
        """What `authenticate` answers, when that needs no I/O: a static token, a token
        TokenReview answered a moment ago (either way), a peer over its failure budget. Safe
        on the event loop; None means: call `authenticate` from a worker thread.

        The thread hop costs about a sixth of the CA's throughput over HTTPS (bench_ca), and
        the threads are few: a caller whose answer is known never queues for one.
        """
        token = bearer_token(authorization)
        answer = self.authenticator.answer_without_io(token)
        if answer is NEEDS_IO:
            self._within_failure_budget(peer)
            return None
        return self._admit(answer, peer)

    def _within_failure_budget(self, peer: str | None) -> None:
        """Refuse (429) a peer whose failed authentications spent its budget, before its token
        costs a TokenReview."""
        if peer is None:
            return
        wait = self._failure_budget.exhausted(peer)
        if wait is not None:
            raise Refusal(RefusalKind.EXHAUSTED, "auth_failures",
                          f"too many failed authentications from {peer[:64]}; retry in "
                          f"{wait}s", wait)

    def _admit(self, caller: Caller | Rejected | None, peer: str | None = None) -> Caller:
        """The authenticated caller, unless unknown, rejected or over its rate."""
        if not isinstance(caller, Caller):
            if peer is not None and self._failure_budget.record_failure(peer):
                log.warning("client %s: too many failed authentications; its tokens are "
                            "refused (429) without a TokenReview until it has waited",
                            peer[:64])
            why = f": {caller.why}" if isinstance(caller, Rejected) else ""
            raise Refusal(RefusalKind.UNAUTHENTICATED, "bad_token",
                          f"the token is not valid for this CA{why}")
        if self._rate_limiter is not None:
            wait = self._rate_limiter.acquire(f"{caller.namespace}/{caller.service_account}")
            if wait is not None:
                raise Refusal(RefusalKind.EXHAUSTED, "rate_limited",
                              f"too many certificate requests for {caller.namespace}/"
                              f"{caller.service_account}; retry in {wait}s", wait)
        return caller

    def issue(self, caller: Caller, csr: str, ttl_seconds: int | None) -> IssuedSvid:
        """Sign `csr` (PEM) as the caller's X509-SVID, for `ttl_seconds` (None: the policy's
        default); or Refusal."""
        try:
            identity = SpiffeId.for_service_account(self.authority.trust_domain,
                                                    caller.namespace, caller.service_account)
        except SpiffeIdError as error:
            raise Refusal(RefusalKind.FORBIDDEN, "bad_identity",
                          f"the caller's identity cannot be a SPIFFE ID: {error}") from None
        started = time.perf_counter()
        try:
            svid = sign_svid(csr, identity, ttl_seconds, self.authority, self._clock(),
                             policy=self.policy)
        except Refusal as refused:
            if refused.kind is RefusalKind.UNAVAILABLE and refused.retry_after_seconds is None:
                # The core knows the CA cannot sign, not when it will again: a caller polls.
                refused.retry_after_seconds = RETRY_AFTER_SECONDS
            raise
        SIGNING_SECONDS.observe(time.perf_counter() - started)
        CERTIFICATES_ISSUED.inc()
        log.info("issued SVID spiffe_id=%s serial=%x expires_at=%s authenticator=%s",
                 svid.spiffe_id, svid.serial_number, rfc3339(svid.expires_at),
                 caller.authenticator)
        return svid


def bearer_token(authorization: str | None) -> str:
    """The token of "Bearer <token>" (scheme case-insensitive); or Refusal no_token."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Refusal(RefusalKind.UNAUTHENTICATED, "no_token", "missing bearer token")
    return token


# --- what every transport records ---------------------------------------------------------------

def count_request() -> None:
    """A certificate request arrived (before anything is read or checked)."""
    CSRS_RECEIVED.inc()


def record_refusal(refusal: Refusal) -> None:
    """Count a refusal by reason, and log it unless it is about the caller's credentials (a
    scanner would fill the log; the counter says how many)."""
    REFUSALS.labels(refusal.reason).inc()
    if refusal.kind is not RefusalKind.UNAUTHENTICATED and refusal.reason not in UNLOGGED_REASONS:
        log.info("refused certificate request: %s (%s)", refusal.reason, refusal.message[:200])


def internal_failure() -> Refusal:
    """Log the exception being handled and return what to answer instead: a bug is not the
    caller's fault and is worth retrying, so UNAVAILABLE, never a traceback."""
    log.exception("certificate request failed unexpectedly")
    REFUSALS.labels("internal").inc()
    return Refusal(RefusalKind.UNAVAILABLE, "internal", "internal error, retry later",
                   RETRY_AFTER_SECONDS)


# --- assembly -----------------------------------------------------------------------------------

def build_ca_service(*, certs_dir: Path, mesh: MeshConfig, token_file: str | None,
                     token_reviewer: TokenReviewer | None, workers: int = 1) -> CAService:
    """Load the CA from `certs_dir` and the authenticators from the settings; for one of
    `workers` processes (serve --workers), each of which limits a share of the CSR rate.

    Raises certsdir.CertsError (a CA that does not load: key mismatch, chain that does not
    verify) or ConfigError (a bad token file, an impossible TTL policy), both one line.
    """
    authority = certsdir.load_authority(Path(certs_dir), mesh.trust_domain)
    if mesh.default_ttl_seconds > mesh.max_ttl_seconds:
        raise ConfigError(
            f"defaultTtlSeconds {mesh.default_ttl_seconds} exceeds maxTtlSeconds "
            f"{mesh.max_ttl_seconds}")
    authenticators: list[Authenticator] = []
    if token_file:
        try:
            authenticators.append(StaticTokens.from_file(token_file))
        except TokenFileError as error:
            raise ConfigError(str(error)) from None
    if token_reviewer is not None:
        authenticators.append(TokenReviewAuthenticator(token_reviewer))
    if not authenticators:
        log.warning("the CA has no authenticator (no --token-file, no Kubernetes API): "
                    "every certificate request will be refused as unauthenticated")
    return CAService(
        authority, AuthenticatorChain(authenticators),
        policy=SigningPolicy(default_ttl_seconds=mesh.default_ttl_seconds,
                             max_ttl_seconds=mesh.max_ttl_seconds),
        # Each worker limits its share, so that together they allow no more than the mesh
        # config says, wherever a caller's connections land.
        rate_limiter=RateLimiter(mesh.csr_rate_per_second / workers,
                                 math.ceil(mesh.csr_burst / workers)),
        failure_budget=FailureBudget(AUTH_FAILURE_RATE / workers,
                                     math.ceil(AUTH_FAILURE_BURST / workers)),
    )
