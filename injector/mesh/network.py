"""Ports and CIDRs as annotations, flags and the mesh config write them: one parser each.

The webhook checks `traffic.sidecar.istio.io/*` annotations with these, `injector iptables`
reads its flags with them and the agent its mesh CIDRs, so all three accept exactly the same text.
"""

from __future__ import annotations

import ipaddress

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_port(text: str) -> int:
    """A TCP port, 1..65535."""
    stripped = text.strip()
    # isascii: str.isdigit() also accepts digits such as superscript two (U+00B2) or a
    # fullwidth five (U+FF15) that Kubernetes and iptables refuse. The length first: int() of
    # a long digit string is not free.
    if (len(stripped) > 5 or not (stripped.isascii() and stripped.isdigit())
            or not 0 < int(stripped) < 65536):
        raise ValueError(f"not a port: {text!r}")
    return int(stripped)


def parse_ports(text: str) -> tuple[int, ...]:
    """A comma-separated port list; empty means none. `*` is not a port list: see parse_port_set."""
    return tuple(parse_port(item) for item in text.split(",") if item.strip())


def parse_port_set(text: str) -> tuple[int, ...] | None:
    """`*` (None: every port) or a comma-separated port list."""
    return None if text.strip() == "*" else parse_ports(text)


def parse_cidr(text: str) -> IpNetwork:
    """An IPv4 or IPv6 CIDR; a bare address means a host route."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a CIDR: {text!r}") from None


def parse_cidrs(text: str) -> tuple[IpNetwork, ...]:
    """A comma-separated CIDR list; empty means none."""
    return tuple(parse_cidr(item) for item in text.split(",") if item.strip())


def parse_cidr_set(text: str) -> tuple[IpNetwork, ...] | None:
    """`*` (None: every destination) or a comma-separated CIDR list."""
    return None if text.strip() == "*" else parse_cidrs(text)
