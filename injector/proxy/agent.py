"""The sidecar agent's pure parts: the CA's address, the key and CSR, the CA's answer, timing.

No I/O here; injector/commands/agent.py is the shell that talks to the CA, writes files and runs
Envoy with these decisions.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from injector.errors import InvalidInput

DEFAULT_CA_PORT = 443


class AgentError(InvalidInput):
    """A setting or an answer the agent cannot work with; the message is one line."""


# --- the CA's address ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CaAddress:
    host: str
    port: int

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def certificates_url(self) -> str:
        return f"{self.base_url}/v1/certificates"


def parse_ca_address(text: str) -> CaAddress:
    """`host:port`, `host` (port 443), `https://host[:port][/]`; IPv6 hosts in brackets.

    Istio's CA_ADDR is `host:port`; a URL is accepted too, but only https: the token must never
    travel in the clear.
    """
    value = text.strip()
    if not value:
        raise AgentError("the CA address is empty")
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme != "https":
            raise AgentError(f"CA address {text!r}: only https:// is allowed")
    else:
        value = f"https://{value}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as error:
        raise AgentError(f"CA address {text!r}: {error}") from None
    host = parts.hostname
    if not host:
        raise AgentError(f"CA address {text!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise AgentError(f"CA address {text!r}: expected host[:port], without a path")
    if ":" in host:  # an IPv6 literal must be one
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AgentError(f"CA address {text!r}: not an IPv6 address") from None
    if port == 0:
        raise AgentError(f"CA address {text!r}: port 0")
    return CaAddress(host, DEFAULT_CA_PORT if port is None else port)


# --- the key and the CSR -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyAndCsr:
    """A fresh private key (only ever in memory and in the 0600 files) and its CSR."""

    key: ec.EllipticCurvePrivateKey
    csr_pem: str

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def new_key_and_csr(spiffe_id: str | None) -> KeyAndCsr:
    """An ECDSA P-256 key and a CSR naming the identity we expect (the CA checks it against the
    token's and refuses a mismatch; it sets the certificate's identity itself in any case)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
    csr = builder.sign(key, hashes.SHA256())
    return KeyAndCsr(key, csr.public_bytes(serialization.Encoding.PEM).decode())


# --- the CA's answer -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Issued:
    """An SVID as the CA returned it, checked."""

    spiffe_id: str
    certificate_chain_pem: str  # leaf first, then intermediates
    trust_bundle_pem: str
    serial: int
    not_after: float  # Unix time, from the leaf itself


def _pem_list(document: dict[str, Any], key: str) -> list[str]:
    value = document.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise AgentError(f"the CA's answer has no {key} list of PEM strings")
    return value


def _pem_text(pems: list[str]) -> str:
    return "".join(pem if pem.endswith("\n") else pem + "\n" for pem in pems)


def parse_issued(document: Any, key: ec.EllipticCurvePrivateKey, trust_domain: str) -> Issued:
    """Check the CA's 200 answer: the leaf is for our key and names an identity in our trust
    domain, and there is a trust bundle. Anything else is an error, never installed."""
    if not isinstance(document, dict):
        raise AgentError("the CA's answer is not a JSON object")
    chain = _pem_list(document, "certificate_chain")
    bundle = _pem_list(document, "trust_bundle")
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        for pem in bundle:
            x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise AgentError("the CA's answer holds a certificate that does not parse") from None
    ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    theirs = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if ours != theirs:
        raise AgentError("the CA's certificate is not for our key")
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1 or not uris[0].startswith(f"spiffe://{trust_domain}/"):
        raise AgentError(f"the CA's certificate names {uris or 'no URI'}, not one SPIFFE ID in "
                         f"trust domain {trust_domain}")
    return Issued(
        spiffe_id=uris[0],
        certificate_chain_pem=_pem_text(chain),
        trust_bundle_pem=_pem_text(bundle),
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def refusal_reason(status: int, body: bytes) -> str:
    """The CA's `{"error": ...}` reason for a refusal, in one line, else the status alone."""
    import json

    try:
        reason = json.loads(body).get("error")
    except (ValueError, AttributeError):
        reason = None
    if isinstance(reason, str) and reason.strip():
        return f"HTTP {status}: {' '.join(reason.split())[:300]}"
    return f"HTTP {status}"


def usable_token(text: str) -> str | None:
    """The token from the token file, or None when it cannot go into an Authorization header
    (empty, or characters a header may not hold): refused here, so no HTTP library ever puts
    the token into an error message that could be logged."""
    token = text.strip()
    if not token or not all(33 <= ord(char) < 127 for char in token):
        return None
    return token


# --- timing --------------------------------------------------------------------------------------

RENEWAL_JITTER = 0.05  # renew up to 5 % of the lifetime before half-life
MIN_RENEWAL_DELAY = 1.0


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
    """Capped exponential backoff with jitter: first, doubling up to `cap`; `reset()` on success.

    A delay suggested by the server (Retry-After) is honoured as a floor.
    """

    first: float = 0.5
    cap: float = 30.0
    random: Callable[[], float] = random.random
    attempts: int = 0

    def next_delay(self, floor: float = 0.0) -> float:
        base = min(self.cap, self.first * 2 ** min(self.attempts, 32))
        self.attempts += 1
        # Up to 20 % less, so many agents waiting on one CA do not retry in lockstep.
        delay = base * (1 - 0.2 * self.random())
        return min(max(delay, floor), max(self.cap, floor))

    def reset(self) -> None:
        self.attempts = 0


# Refusals will not go away by asking again at once (a bad token, a forbidden identity): wait at
# least this long between such attempts.
REFUSAL_MIN_DELAY = 5.0


def retry_after_seconds(header: str | None) -> float:
    """A Retry-After header in seconds (the CA sends seconds); 0 when absent or not a number."""
    if header is None:
        return 0.0
    try:
        return max(0.0, min(float(header.strip()), 300.0))
    except ValueError:
        return 0.0
