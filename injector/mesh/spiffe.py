"""SPIFFE IDs: the one place that builds and parses them.

A workload's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. The
SPIFFE-ID standard is strict on purpose (lowercase trust domain, no empty, `.` or `..` path
segments, a small character set, length limits) so that two parties never disagree on whether two
IDs are the same. Everything that names a workload goes through `SpiffeId`, so an ID that would
be ambiguous is refused before it can reach a certificate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from injector.errors import InvalidInput

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class SpiffeIdError(InvalidInput):
    """Text that is not a valid SPIFFE ID (or trust domain, or path); the message says why."""


def validate_trust_domain(trust_domain: str) -> str:
    """Return the trust domain unchanged, or raise SpiffeIdError saying what is wrong."""
    if not trust_domain:
        raise SpiffeIdError("trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN_CHARS.fullmatch(trust_domain):
        raise SpiffeIdError(
            f"trust domain {trust_domain!r} may contain only lowercase letters, digits, "
            "'.', '-' and '_'"
        )
    return trust_domain


def validate_path(path: str) -> str:
    """Return the path unchanged (empty, or `/seg/seg...`), or raise SpiffeIdError."""
    if path == "":
        return path
    if not path.startswith("/"):
        raise SpiffeIdError("path must start with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise SpiffeIdError("path has an empty segment (or a trailing '/')")
        if segment in (".", ".."):
            raise SpiffeIdError("path segments may not be '.' or '..'")
        if not _SEGMENT_CHARS.fullmatch(segment):
            raise SpiffeIdError(
                f"path segment {segment!r} may contain only letters, digits, '.', '-' and '_'"
            )
    return path


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A valid SPIFFE ID. Construct with `parse` or `for_service_account`, which validate."""

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        validate_path(self.path)
        if len(SCHEME_PREFIX) + len(self.trust_domain) + len(self.path) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse `spiffe://trust-domain/path`; raise SpiffeIdError on anything else."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_LENGTH:
            raise SpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_LENGTH} bytes")
        # The scheme is case-sensitive in the standard: "SPIFFE://" is not a SPIFFE ID.
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError("SPIFFE ID must start with 'spiffe://'")
        rest = text[len(SCHEME_PREFIX):]
        slash = rest.find("/")
        trust_domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        # Ports, user info, queries and fragments fail the character checks below.
        return cls(trust_domain, path)

    @classmethod
    def for_service_account(cls, trust_domain: str, namespace: str, service_account: str
                            ) -> SpiffeId:
        """The identity of a Kubernetes service account, as Istio names it."""
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if "/" in value or not value:
                raise SpiffeIdError(f"{what} {value!r} is not a single path segment")
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @property
    def service_account(self) -> tuple[str, str] | None:
        """(namespace, service account) when the path is `/ns/<ns>/sa/<sa>`, else None."""
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[2], parts[4]
        return None
