"""Who is asking the CA for a certificate: authenticators behind one interface, tried in order.

Each authenticator maps a bearer token to a `Caller` (namespace and service account), says it
does not know the token (None), or raises `AuthenticationUnavailable` when it cannot decide right
now (the Kubernetes API is down): that is a 503 the caller should retry, never a 401 that would
make it give up. Tokens are secrets: they are never logged, and caches key on their SHA-256.

An authenticator may also answer without I/O (`answer_without_io`): the static tokens always
can, TokenReview can from its cache. The CA answers those on the event loop, so a caller whose
answer is known never waits behind the ones that need the API server.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

import yaml

from injector.errors import ConfigError, Unavailable
from injector.mesh.names import TOKEN_AUDIENCE
from injector.mesh.spiffe import SpiffeIdError, validate_path

log = logging.getLogger("injector.ca.authn")

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Caller:
    namespace: str
    service_account: str
    authenticator: str  # which authenticator vouched for it, for logs and metrics


class AuthenticationUnavailable(Unavailable):
    """The authenticator cannot decide now (e.g. the Kubernetes API is unreachable): retry.
    `reason` is the refusal's reason in metrics."""

    def __init__(self, message: str, retry_after_seconds: int = 5,
                 reason: str = "auth_unavailable") -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.reason = reason


class NeedsIo(enum.Enum):
    """What `answer_without_io` says when only I/O (a TokenReview) can tell."""

    NEEDS_IO = "needs-io"


NEEDS_IO: Final = NeedsIo.NEEDS_IO


@dataclass(frozen=True)
class Rejected:
    """A token an authenticator knows and refuses, and why, in one line the caller may see
    (it is the caller's own token: the reason helps it, and tells nobody else anything)."""

    why: str


# A Caller; Rejected (with why) or None (unknown) for a token that is not good; or NEEDS_IO.
Answer = Caller | Rejected | None | Literal[NeedsIo.NEEDS_IO]
MAX_REASON_LENGTH: Final = 200


class TokenFileError(ConfigError):
    """The static token file cannot be used; the message is one line."""


class Authenticator(Protocol):
    name: str

    def authenticate(self, token: str) -> Caller | Rejected | None:
        """The caller the token belongs to; Rejected (why) if it knows the token is not good;
        None if it does not know it; AuthenticationUnavailable if it cannot tell now."""
        ...


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _check_segment(what: str, value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise TokenFileError(f"{where}: {what} must be a non-empty string")
    try:
        validate_path(f"/{value}")
        if "/" in value:
            raise SpiffeIdError("contains '/'")
    except SpiffeIdError as error:
        raise TokenFileError(f"{where}: {what} {value!r} cannot be a SPIFFE ID segment "
                             f"({error})") from None
    return value


def _stamp(path: Path) -> tuple[int, int, int]:
    status = path.stat()  # through the symlinks a mounted Secret swaps
    return (status.st_mtime_ns, status.st_ino, status.st_size)


def _read_token_file(path: Path) -> dict[bytes, Caller]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TokenFileError(f"token file {path}: cannot read ({error.strerror})") from None
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError:
        raise TokenFileError(f"token file {path}: not valid YAML") from None
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise TokenFileError(
            f"token file {path}: expected a list of {{token, namespace, serviceAccount}}")
    identities: dict[bytes, Caller] = {}
    for index, entry in enumerate(entries):
        where = f"token file {path} entry {index + 1}"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where}: expected a mapping")
        unknown = set(entry) - {"token", "namespace", "serviceAccount"}
        if unknown:
            raise TokenFileError(f"{where}: unknown key {sorted(map(str, unknown))[0]!r}")
        token = entry.get("token")
        if not isinstance(token, str) or not token.strip():
            raise TokenFileError(f"{where}: token must be a non-empty string")
        caller = Caller(_check_segment("namespace", entry.get("namespace"), where),
                        _check_segment("serviceAccount", entry.get("serviceAccount"), where),
                        StaticTokens.name)
        digest = token_digest(token.strip())
        if identities.get(digest, caller) != caller:
            raise TokenFileError(f"{where}: the same token is given two identities")
        identities[digest] = caller
    return identities


class StaticTokens:
    """Tokens from a YAML file (`--token-file`): a list of {token, namespace, serviceAccount}.

    `reload_if_changed` reads the file again when it changed on disk (a Secret update), so
    tokens are added and revoked without a restart.
    """

    name = "static"

    def __init__(self, identities: dict[bytes, Caller], source: Path | None = None) -> None:
        self._by_digest = identities
        self._source = source
        self._stamp: tuple[int, int, int] | None = (
            _stamp(source) if source is not None else None)

    @classmethod
    def from_file(cls, path: str | Path) -> StaticTokens:
        return cls(_read_token_file(Path(path)), Path(path))

    def reload_if_changed(self) -> bool:
        """Read the file again if it changed; a file that does not load leaves the tokens
        loaded before in force (often a Secret update caught half-written)."""
        if self._source is None:
            return False
        try:
            stamp: tuple[int, int, int] | None = _stamp(self._source)
        except OSError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # a problem is said once per change of the file, not every poll
        try:
            identities = _read_token_file(self._source)
        except TokenFileError as error:
            log.warning("static tokens not reloaded: %s", error)
            return False
        self._by_digest = identities  # one assignment: readers see the old set or the new
        log.info("static tokens reloaded from %s: %d identities", self._source,
                 len(set(identities.values())))
        return True

    def authenticate(self, token: str) -> Caller | None:
        return self._by_digest.get(token_digest(token))

    def answer_without_io(self, token: str) -> Answer:
        return self._by_digest.get(token_digest(token))


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying it (only to bound a cache entry)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(payload))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (ValueError, TypeError):
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def parse_service_account_username(username: str) -> tuple[str, str] | None:
    """`system:serviceaccount:<ns>:<sa>` -> (ns, sa); anything else (a user, a node) -> None."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    parts = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


@dataclass(frozen=True)
class ReviewedToken:
    """What the Kubernetes API said of a token (TokenReview's status)."""

    authenticated: bool
    audiences: tuple[str, ...]
    username: str
    error: str = ""  # the API server's reason when not authenticated


class TokenReviewer(Protocol):
    def review(self, token: str, audience: str) -> ReviewedToken:
        """Ask the API about `token` for `audience`; AuthenticationUnavailable if it cannot
        answer now. (injector.kube.tokenreview asks a real API server.)"""
        ...


# What a TokenReview authenticator remembers, and how much of the API server it may use at once.
POSITIVE_CACHE_SECONDS: Final = 60.0
NEGATIVE_CACHE_SECONDS: Final = 10.0
MAX_CACHE_ENTRIES: Final = 4096  # each for positive and for negative answers (~100 B each)
MAX_CONCURRENT_REVIEWS: Final = 8  # per serve process
# A projected token is about 1 KiB; a much longer one is not one, and is not sent to the API.
MAX_TOKEN_LENGTH: Final = 16 * 1024
BUSY_RETRY_AFTER_SECONDS: Final = 1
BUSY_LOG_INTERVAL_SECONDS: Final = 10.0  # "at the limit" said at most this often


class _BoundedCache:
    """Answers by token digest until a deadline; at most `max_entries`, the oldest dropped first.

    The lock is held for a dictionary operation only, never across a TokenReview: a lookup
    never waits for the API server."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: dict[bytes, tuple[Caller | Rejected, float]] = {}
        self._lock = threading.Lock()

    def get(self, digest: bytes, now: float) -> tuple[Caller | Rejected] | None:
        """(answer,) while it is valid; None when unknown or expired."""
        with self._lock:
            entry = self._entries.get(digest)
        if entry is None or now >= entry[1]:
            return None
        return (entry[0],)

    def put(self, digest: bytes, answer: Caller | Rejected, valid_until: float,
            now: float) -> None:
        with self._lock:
            self._entries.pop(digest, None)  # re-inserted last: the newest
            if len(self._entries) >= self._max_entries:
                for key in [k for k, (_, until) in self._entries.items() if until <= now]:
                    del self._entries[key]
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest entry
            self._entries[digest] = (answer, valid_until)

    def __len__(self) -> int:
        return len(self._entries)


class TokenReviewAuthenticator:
    """Kubernetes TokenReview with audience `istio-ca`; answers cached briefly by token digest.

    Positive answers are kept `cache_seconds` (never past the token's own expiry), negative
    ones `negative_cache_seconds`, each cache bounded in entries, so a token is reviewed at
    most once per period however often it is sent. At most `max_concurrent_reviews` reviews
    are in flight at once: beyond that the answer is "busy, retry in a second" (503), so a flood
    of unknown tokens cannot take every worker thread or overload the API server.

    The rules (audience, service accounts only, the caches) live here; the call itself is the
    `TokenReviewer`'s, so the CA knows nothing of the kubernetes client."""

    name = "tokenreview"

    def __init__(self, reviewer: TokenReviewer, *, audience: str = TOKEN_AUDIENCE,
                 cache_seconds: float = POSITIVE_CACHE_SECONDS,
                 negative_cache_seconds: float = NEGATIVE_CACHE_SECONDS,
                 max_cache_entries: int = MAX_CACHE_ENTRIES,
                 max_concurrent_reviews: int = MAX_CONCURRENT_REVIEWS,
                 clock: Callable[[], float] = time.time) -> None:
        self._reviewer = reviewer
        self._audience = audience
        self._cache_seconds = cache_seconds
        self._negative_cache_seconds = negative_cache_seconds
        self._clock = clock
        self._known = _BoundedCache(max_cache_entries)
        self._refused = _BoundedCache(max_cache_entries)
        self._max_concurrent_reviews = max_concurrent_reviews
        self._in_flight = threading.BoundedSemaphore(max_concurrent_reviews)
        self._busy_said_at = -math.inf

    def answer_without_io(self, token: str) -> Answer:
        """The cached answer (a Caller, or Rejected for a token refused a moment ago); NEEDS_IO
        when only a review can tell. Never blocks: safe on the event loop."""
        if len(token) > MAX_TOKEN_LENGTH:
            return Rejected(f"it is over {MAX_TOKEN_LENGTH} bytes: no service-account token is")
        digest = token_digest(token)
        now = self._clock()
        for cache in (self._known, self._refused):
            cached = cache.get(digest, now)
            if cached is not None:
                return cached[0]
        return NEEDS_IO

    def authenticate(self, token: str) -> Caller | Rejected | None:
        answer = self.answer_without_io(token)
        if answer is not NEEDS_IO:
            return answer
        if not self._in_flight.acquire(blocking=False):
            self._say_busy()
            raise AuthenticationUnavailable(
                "too many token reviews in flight", BUSY_RETRY_AFTER_SECONDS, "tokenreview_busy")
        try:
            reviewed = self._review(token)
        finally:
            self._in_flight.release()
        now = self._clock()
        digest = token_digest(token)
        if isinstance(reviewed, Rejected):
            self._refused.put(digest, reviewed, now + self._negative_cache_seconds, now)
            return reviewed
        # Never trust a cached answer past the token's own expiry.
        valid_until = now + self._cache_seconds
        expiry = jwt_expiry(token)
        if expiry is not None:
            valid_until = min(valid_until, expiry)
        if valid_until > now:
            self._known.put(digest, reviewed, valid_until, now)
        return reviewed

    def _say_busy(self) -> None:
        now = time.monotonic()
        if now - self._busy_said_at >= BUSY_LOG_INTERVAL_SECONDS:
            self._busy_said_at = now  # a race here only means one line more
            log.warning("TokenReview: %d reviews in flight, the limit; refusing more (503, "
                        "retry in %ds) until one ends", self._max_concurrent_reviews,
                        BUSY_RETRY_AFTER_SECONDS)

    def _review(self, token: str) -> Caller | Rejected:
        reviewed = self._reviewer.review(token, self._audience)
        if not reviewed.authenticated:
            log.debug("TokenReview: token not authenticated")
            why = " ".join(reviewed.error.split())[:MAX_REASON_LENGTH]
            return Rejected(f"the Kubernetes API did not authenticate it ({why})" if why else
                            "the Kubernetes API did not authenticate it")
        if self._audience not in reviewed.audiences:
            # An empty list means "valid for the API server", not for us (TokenReview docs).
            log.info("TokenReview: token not valid for audience %s", self._audience)
            return Rejected(f"it is not valid for audience {self._audience}")
        identity = parse_service_account_username(reviewed.username)
        if identity is None:
            log.info("TokenReview: %r is not a service account", reviewed.username[:200])
            return Rejected("it is not a service account's token")
        namespace, service_account = identity
        return Caller(namespace, service_account, self.name)


class AuthenticatorChain:
    """Try each authenticator in order; the first that knows the token wins."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)
        # Each authenticator's lookup without I/O, or None for one that has none (every answer
        # of it may need I/O). Looked up once here, not per request.
        self._lookups: tuple[Callable[[str], Answer] | None, ...] = tuple(
            getattr(authenticator, "answer_without_io", None)
            for authenticator in self.authenticators)

    def answer_without_io(self, token: str) -> Answer:
        """What `authenticate` would answer, when that takes no I/O; else NEEDS_IO."""
        for lookup in self._lookups:
            answer = NEEDS_IO if lookup is None else lookup(token)
            if answer is NEEDS_IO or answer is not None:
                return answer  # this one knows, or only I/O can tell: the rest do not matter
        return None

    def reload_if_changed(self) -> None:
        for authenticator in self.authenticators:
            if isinstance(authenticator, StaticTokens):
                authenticator.reload_if_changed()

    def authenticate(self, token: str) -> Caller | Rejected | None:
        unavailable: AuthenticationUnavailable | None = None
        rejected: Rejected | None = None
        for authenticator in self.authenticators:
            try:
                answer = authenticator.authenticate(token)
            except AuthenticationUnavailable as error:
                unavailable = unavailable or error
                continue
            if isinstance(answer, Caller):
                return answer
            rejected = rejected or answer
        if unavailable is not None:
            raise unavailable
        return rejected
