"""Ports and CIDRs as annotations, flags and the mesh config write them: one parser each.

The webhook checks `traffic.sidecar.istio.io/*` annotations with these, `injector iptables`
reads its flags with them and the agent its mesh CIDRs, so all three accept exactly the same text.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

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
    """An IPv4 or IPv6 CIDR; a bare address means a host route.

    Exactly what `ipaddress.ip_network(strict=False)` accepts, and the same value; but the
    common forms (an address, then `/` and a prefix length) are read by the C library's
    inet_pton, four times faster for IPv6: a pod's CIDR annotations are read while the API
    server waits. Anything else (a netmask after the `/`, text inet_pton refuses) goes to
    ipaddress, whose answer stands.
    """
    stripped = text.strip()
    address, slash, prefix = stripped.partition("/")
    version6 = ":" in address
    if (not slash or (prefix.isascii() and prefix.isdigit() and len(prefix) <= 3)) and (
            address.isascii()):
        try:
            packed = socket.inet_pton(socket.AF_INET6 if version6 else socket.AF_INET, address)
        except OSError:
            packed = None
        bits = 128 if version6 else 32
        length = int(prefix) if slash else bits
        if packed is not None and length <= bits and (not slash or prefix == str(length)):
            network = ipaddress.IPv6Network if version6 else ipaddress.IPv4Network
            return network((int.from_bytes(packed, "big"), length), strict=False)
    try:
        return ipaddress.ip_network(stripped, strict=False)
    except ValueError:
        raise ValueError(f"not a CIDR: {text!r}") from None


def parse_cidrs(text: str) -> tuple[IpNetwork, ...]:
    """A comma-separated CIDR list; empty means none."""
    return tuple(parse_cidr(item) for item in text.split(",") if item.strip())


def parse_cidr_set(text: str) -> tuple[IpNetwork, ...] | None:
    """`*` (None: every destination) or a comma-separated CIDR list."""
    return None if text.strip() == "*" else parse_cidrs(text)


@dataclass(frozen=True, slots=True)
class Cidr:
    """A CIDR as it was written (`10.96.0.1/24`: host bits kept, as Istio passes them on) and
    the network it names (`10.96.0.0/24`: what the rules match, as iptables-save shows them)."""

    text: str
    network: IpNetwork

    def __str__(self) -> str:
        return self.text


def parse_written_cidrs(text: str) -> tuple[Cidr, ...]:
    """A comma-separated CIDR list, each kept as written (less blanks); empty means none."""
    return tuple(Cidr(item.strip(), parse_cidr(item)) for item in text.split(",")
                 if item.strip())


def parse_written_cidr_set(text: str) -> tuple[Cidr, ...] | None:
    """`*` (None: every destination) or a comma-separated CIDR list, kept as written."""
    return None if text.strip() == "*" else parse_written_cidrs(text)


# A Linux interface name (at most 15 bytes; no `/`, `:` or blanks), in the ASCII a pod's
# interfaces are named with; iptables' `+` at its end matches every name it begins.
_INTERFACE = re.compile(r"[A-Za-z0-9_.@-]{1,15}\+?|\+")


def parse_interface(text: str) -> str:
    """A network interface name as iptables' `-i`/`-o` take it (`eth1`, `veth+`)."""
    stripped = text.strip()
    if (not _INTERFACE.fullmatch(stripped) or len(stripped) > 15
            or stripped.rstrip("+") in (".", "..")):
        raise ValueError(f"not a network interface name: {text!r}")
    return stripped


def parse_interfaces(text: str) -> tuple[str, ...]:
    """A comma-separated list of interface names; empty means none."""
    return tuple(parse_interface(item) for item in text.split(",") if item.strip())
