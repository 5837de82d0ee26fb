"""Traffic redirection: the options shared by the webhook and `injector iptables`, and the rules.

The webhook turns mesh config and `traffic.sidecar.istio.io/*` annotations into `TrafficOptions`
and renders them with `to_args()` onto the init container's command line; `injector iptables`
parses the same flags back into `TrafficOptions`. One model, so the two sides cannot drift.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_EXCLUDED_INBOUND_PORTS: tuple[int, ...] = (15090, 15021, 15020)


def parse_port(text: str) -> int:
    """A TCP port, 1..65535."""
    stripped = text.strip()
    if not stripped.isdigit() or not 0 < int(stripped) < 65536:
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


def parse_mode(text: str) -> str:
    if text != "REDIRECT":
        raise ValueError(f"unsupported interception mode {text!r}: only REDIRECT")
    return text


def _join(values: tuple[object, ...] | None) -> str:
    return "*" if values is None else ",".join(str(value) for value in values)


@dataclass(frozen=True)
class TrafficOptions:
    """What `istio-iptables` is told, with Istio's defaults.

    `None` for an include list means `*` (everything).
    """

    proxy_port: int = 15001
    inbound_capture_port: int = 15006
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    mode: str = "REDIRECT"
    include_outbound_cidrs: tuple[IpNetwork, ...] | None = None
    exclude_outbound_cidrs: tuple[IpNetwork, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = field(default=DEFAULT_EXCLUDED_INBOUND_PORTS)
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_ports: tuple[int, ...] = ()

    def to_args(self) -> list[str]:
        """The `injector iptables` command-line flags (Istio's short flags) for these options."""
        args = [
            "-p", str(self.proxy_port),
            "-z", str(self.inbound_capture_port),
            "-u", str(self.proxy_uid),
            "-g", str(self.proxy_gid),
            "-m", self.mode,
            "-i", _join(self.include_outbound_cidrs),
            "-x", _join(self.exclude_outbound_cidrs),
            "-b", _join(self.include_inbound_ports),
            "-d", _join(self.exclude_inbound_ports),
        ]
        if self.exclude_outbound_ports:
            args += ["-o", _join(self.exclude_outbound_ports)]
        if self.include_outbound_ports:
            args += ["-q", _join(self.include_outbound_ports)]
        return args
