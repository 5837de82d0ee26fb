"""Who is asking the CA for a certificate: authenticators behind one interface, tried in order.

Each authenticator maps a bearer token to a `Caller` (namespace and service account), says it
does not know the token (None), or raises `AuthenticationUnavailable` when it cannot decide right
now (the Kubernetes API is down): that is a 503 the caller should retry, never a 401 that would
make it give up. Tokens are secrets: they are never logged, and caches key on their SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    """The authenticator cannot decide now (e.g. the Kubernetes API is unreachable): retry."""

    def __init__(self, message: str, retry_after_seconds: int = 5) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class TokenFileError(ConfigError):
    """The static token file cannot be used; the message is one line."""


class Authenticator(Protocol):
    name: str

    def authenticate(self, token: str) -> Caller | None:
        """The caller the token belongs to; None if unknown; AuthenticationUnavailable."""
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


class TokenReviewer(Protocol):
    def review(self, token: str, audience: str) -> ReviewedToken:
        """Ask the API about `token` for `audience`; AuthenticationUnavailable if it cannot
        answer now. (injector.kube.tokenreview asks a real API server.)"""
        ...


class TokenReviewAuthenticator:
    """Kubernetes TokenReview with audience `istio-ca`, positive answers cached briefly.

    The rules (audience, service accounts only, the cache) live here; the call itself is the
    `TokenReviewer`'s, so the CA knows nothing of the kubernetes client."""

    name = "tokenreview"

    def __init__(self, reviewer: TokenReviewer, *, audience: str = TOKEN_AUDIENCE,
                 cache_seconds: float = 60.0, max_cache_entries: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        self._reviewer = reviewer
        self._audience = audience
        self._cache_seconds = cache_seconds
        self._max_cache_entries = max_cache_entries
        self._clock = clock
        self._cache: dict[bytes, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    def authenticate(self, token: str) -> Caller | None:
        digest = token_digest(token)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None:
            caller, valid_until = cached
            if now < valid_until:
                return caller
        reviewed = self._review(token)
        if reviewed is not None:
            # Never trust a cached answer past the token's own expiry.
            valid_until = now + self._cache_seconds
            expiry = jwt_expiry(token)
            if expiry is not None:
                valid_until = min(valid_until, expiry)
            if valid_until > now:
                self._remember(digest, reviewed, valid_until, now)
        return reviewed

    def _remember(self, digest: bytes, caller: Caller, valid_until: float, now: float) -> None:
        with self._lock:
            if len(self._cache) >= self._max_cache_entries:
                for key in [k for k, (_, until) in self._cache.items() if until <= now]:
                    del self._cache[key]
            while len(self._cache) >= self._max_cache_entries:
                del self._cache[next(iter(self._cache))]  # the oldest entry
            self._cache[digest] = (caller, valid_until)

    def _review(self, token: str) -> Caller | None:
        reviewed = self._reviewer.review(token, self._audience)
        if not reviewed.authenticated:
            log.info("TokenReview: token not authenticated")
            return None
        if self._audience not in reviewed.audiences:
            # An empty list means "valid for the API server", not for us (TokenReview docs).
            log.info("TokenReview: token not valid for audience %s", self._audience)
            return None
        identity = parse_service_account_username(reviewed.username)
        if identity is None:
            log.info("TokenReview: %r is not a service account", reviewed.username[:200])
            return None
        namespace, service_account = identity
        return Caller(namespace, service_account, self.name)


class AuthenticatorChain:
    """Try each authenticator in order; the first that knows the token wins."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)

    def reload_if_changed(self) -> None:
        for authenticator in self.authenticators:
            if isinstance(authenticator, StaticTokens):
                authenticator.reload_if_changed()

    def authenticate(self, token: str) -> Caller | None:
        unavailable: AuthenticationUnavailable | None = None
        for authenticator in self.authenticators:
            try:
                caller = authenticator.authenticate(token)
            except AuthenticationUnavailable as error:
                unavailable = unavailable or error
                continue
            if caller is not None:
                return caller
        if unavailable is not None:
            raise unavailable
        return None
