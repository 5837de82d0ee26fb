"""Where the agent finds the CA: Istio's CA_ADDR (`host:port`), or an https URL.

Checked once, before anything starts, so a wrong address is a one-line error at start rather than
a retry loop that can never succeed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from injector.errors import ConfigError

DEFAULT_CA_PORT = 443


class CaAddressError(ConfigError):
    """A CA address the agent cannot use; the message is one line."""


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
        raise CaAddressError("the CA address is empty")
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme != "https":
            raise CaAddressError(f"CA address {text!r}: only https:// is allowed")
    else:
        value = f"https://{value}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as error:
        raise CaAddressError(f"CA address {text!r}: {error}") from None
    host = parts.hostname
    if not host:
        raise CaAddressError(f"CA address {text!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise CaAddressError(f"CA address {text!r}: expected host[:port], without a path")
    if ":" in host:  # an IPv6 literal must be one
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise CaAddressError(f"CA address {text!r}: not an IPv6 address") from None
    if port == 0:
        raise CaAddressError(f"CA address {text!r}: port 0")
    return CaAddress(host, DEFAULT_CA_PORT if port is None else port)
