"""`injector iptables`: the init container's program (SPEC section 5).

A thin shell around `injector.iptables.build_restore_input`: parse Istio's `istio-iptables` flags
into `TrafficOptions`, read which hooks an earlier run left (`iptables-save -t nat`), and apply
the whole nat change in one `iptables-restore --noflush` (and `ip6tables-restore` for IPv6).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from injector.commands.cli import CommandParser, UsageError
from injector.errors import InjectorError
from injector.mesh.network import (
    parse_interfaces,
    parse_port,
    parse_port_set,
    parse_ports,
    parse_written_cidr_set,
    parse_written_cidrs,
)
from injector.traffic.iptables import (
    TrafficOptions,
    build_restore_input,
    find_installed_hooks,
    has_global_ipv6_address,
    parse_id,
    parse_mode,
)

# iptables talks to the kernel only; anything slower than this is stuck (e.g. on the xtables lock).
IPTABLES_TIMEOUT_SECONDS = 30

IF_INET6 = Path("/proc/net/if_inet6")


@dataclass(frozen=True)
class _Flag:
    """One `istio-iptables` flag: its names, the `TrafficOptions` field and the parser."""

    short: str
    long: str
    istio_long: str
    field: str
    parse: Callable[[str], Any]
    help: str

    @property
    def names(self) -> str:
        return f"{self.short}/{self.long}"


# Istio's short flags keep their meanings; the long names are ours (the `TrafficOptions` field
# names, also the INJECTOR_<FIELD> environment variables) with Istio's long names as aliases.
FLAGS: tuple[_Flag, ...] = (
    _Flag("-p", "--proxy-port", "--envoy-port", "proxy_port", parse_port,
          "port all outbound TCP is redirected to (15001)"),
    _Flag("-z", "--inbound-capture-port", "--inbound-capture-port", "inbound_capture_port",
          parse_port, "port all inbound TCP is redirected to (15006)"),
    _Flag("-u", "--proxy-uid", "--proxy-uid", "proxy_uid", parse_id,
          "uid of the proxy, whose traffic is not redirected (1337)"),
    _Flag("-g", "--proxy-gid", "--proxy-gid", "proxy_gid", parse_id,
          "gid of the proxy, whose traffic is not redirected (1337)"),
    _Flag("-m", "--mode", "--istio-inbound-interception-mode", "mode", parse_mode,
          "interception mode: REDIRECT only (Istio's TPROXY is refused)"),
    _Flag("-i", "--include-outbound-cidrs", "--istio-service-cidr", "include_outbound_cidrs",
          parse_written_cidr_set,
          "outbound CIDRs to redirect, comma-separated, `*` for all (`*`)"),
    _Flag("-x", "--exclude-outbound-cidrs", "--istio-service-exclude-cidr",
          "exclude_outbound_cidrs", parse_written_cidrs, "outbound CIDRs never redirected"),
    _Flag("-b", "--include-inbound-ports", "--istio-inbound-ports", "include_inbound_ports",
          parse_port_set, "inbound ports to redirect, `*` for all, empty for none (`*`)"),
    _Flag("-d", "--exclude-inbound-ports", "--istio-local-exclude-ports", "exclude_inbound_ports",
          parse_ports, "inbound ports never redirected (15090,15021,15020)"),
    _Flag("-o", "--exclude-outbound-ports", "--istio-local-outbound-ports-exclude",
          "exclude_outbound_ports", parse_ports, "outbound ports never redirected"),
    _Flag("-q", "--include-outbound-ports", "--istio-outbound-ports", "include_outbound_ports",
          parse_ports, "outbound ports redirected whatever the destination"),
    _Flag("-c", "--exclude-interfaces", "--istio-exclude-interfaces", "exclude_interfaces",
          parse_interfaces, "interfaces whose traffic, in or out, is never redirected"),
    _Flag("-k", "--reroute-virtual-interfaces", "--kube-virt-interfaces",
          "reroute_virtual_interfaces", parse_interfaces,
          "virtual interfaces (a VM's) whose incoming traffic is redirected as outbound"),
)


def add_arguments(parser: CommandParser) -> None:
    for flag in FLAGS:
        aliases = () if flag.istio_long == flag.long else (flag.istio_long,)
        # Values stay strings here and are parsed in traffic_options(): argparse's own message
        # for a bad `type=` value does not say what is wrong with it.
        parser.option(flag.short, flag.long, *aliases, dest=flag.field, metavar="VALUE",
                      help=flag.help)
    parser.switch("-n", "--dry-run", help="print the iptables-restore input, change nothing")
    parser.switch("--ipv6", help="also program IPv6 (ip6tables), with ::1 and ::6; "
                                 "on by default when the pod has a global IPv6 address")
    parser.switch("--no-ipv6", help="IPv4 only, even when the pod has an IPv6 address")


def traffic_options(args: argparse.Namespace) -> TrafficOptions:
    """The options from parsed arguments: the flags given, `TrafficOptions` defaults otherwise."""
    values: dict[str, Any] = {}
    for flag in FLAGS:
        raw = getattr(args, flag.field, None)
        if raw is None:
            continue
        try:
            values[flag.field] = flag.parse(raw)
        except ValueError as error:
            raise UsageError(f"{flag.names}: {error}") from None
    return TrafficOptions(**values)


def _wants_ipv6(args: argparse.Namespace) -> bool:
    if args.ipv6 and args.no_ipv6:
        raise UsageError("--ipv6 and --no-ipv6 contradict each other")
    if args.ipv6 or args.no_ipv6:
        return bool(args.ipv6)
    # A dual-stack pod: its IPv6 traffic must be captured too, or it would bypass the proxy.
    try:
        return has_global_ipv6_address(IF_INET6.read_text(encoding="ascii"))
    except OSError:
        return False  # no IPv6 in this kernel or namespace


class IptablesFailed(InjectorError):
    """An iptables tool is missing or failed; the message says which and why."""


def _run_tool(argv: list[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise IptablesFailed(f"{argv[0]} not found on PATH: install iptables (Debian: iptables)")
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=IPTABLES_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise IptablesFailed(f"{' '.join(argv)} did not finish in "
                             f"{IPTABLES_TIMEOUT_SECONDS} s") from None
    except OSError as error:
        raise IptablesFailed(f"cannot run {argv[0]}: {error.strerror}") from None
    if done.returncode != 0:
        # Its own words first: they name the line and the reason.
        sys.stderr.write(done.stderr)
        raise IptablesFailed(f"{' '.join(argv)} failed with exit code {done.returncode}")
    return done.stdout


# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h)
_RTM_NEWADDR = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFA_F_NODAD = 0x02
_RT_SCOPE_HOST = 254
IPV6_PASSTHROUGH_SOURCE = "::6"


def _add_address_to_loopback(address: str) -> None:
    """`ip -6 addr replace ADDRESS/128 dev lo`, over rtnetlink so that the init image needs no
    iproute2.

    IPv4 loopback owns all of 127.0.0.0/8, so the proxy can bind 127.0.0.6 as it is; IPv6
    loopback has ::1 only, so ::6 must be added before the proxy can bind it (Istio does the same).
    Replacing makes a second run a no-op.
    """
    packed = socket.inet_pton(socket.AF_INET6, address)
    attribute = struct.pack("=HH", 4 + len(packed), _IFA_LOCAL) + packed
    attributes = attribute + struct.pack("=HH", 4 + len(packed), _IFA_ADDRESS) + packed
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    try:
        body = struct.pack("=BBBBI", socket.AF_INET6, 128, _IFA_F_NODAD, _RT_SCOPE_HOST,
                           socket.if_nametoindex("lo")) + attributes
        message = struct.pack("=IHHII", 16 + len(body), _RTM_NEWADDR, flags, 1, 0) + body
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as route:
            route.settimeout(IPTABLES_TIMEOUT_SECONDS)
            route.sendto(message, (0, 0))
            reply = route.recv(4096)
    except OSError as error:
        raise IptablesFailed(f"cannot add {address}/128 to lo: {error}") from None
    # The acknowledgement: an NLMSG_ERROR whose error is 0 on success, -errno otherwise.
    _, kind, _, _, _ = struct.unpack_from("=IHHII", reply)
    code = struct.unpack_from("=i", reply, 16)[0] if kind == _NLMSG_ERROR else 0
    if code != 0:
        raise IptablesFailed(f"cannot add {address}/128 to lo: {os.strerror(-code)} "
                             f"({errno.errorcode.get(-code, -code)})")


def _apply(options: TrafficOptions, ipv6: bool) -> str:
    """Replace our nat rules in one `iptables-restore --noflush`; return what was applied."""
    prefix = "ip6tables" if ipv6 else "iptables"
    saved = _run_tool([f"{prefix}-save", "-t", "nat"])
    restore_input = build_restore_input(options, ipv6, find_installed_hooks(saved))
    _run_tool([f"{prefix}-restore", "--noflush"], stdin=restore_input)
    if ipv6:
        _add_address_to_loopback(IPV6_PASSTHROUGH_SOURCE)
    return restore_input


def run(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before anything is applied.
    options = traffic_options(args)
    families = [False, True] if _wants_ipv6(args) else [False]
    if args.dry_run:
        for ipv6 in families:
            sys.stdout.write(build_restore_input(options, ipv6))
        return 0
    for ipv6 in families:
        try:
            applied = _apply(options, ipv6)
        except IptablesFailed as error:
            print(f"injector: {error}", file=sys.stderr)
            return 1
        # The init container's log: what it did, for whoever debugs the pod's traffic.
        sys.stdout.write(applied)
    return 0
