"""Traffic redirection: the options shared by the webhook and `injector iptables`, and the rules.

The webhook turns mesh config and `traffic.sidecar.istio.io/*` annotations into `TrafficOptions`
and renders them with `to_args()` onto the init container's command line; `injector iptables`
parses the same flags back into `TrafficOptions`. One model, so the two sides cannot drift.

`build_restore_input()` is the pure half of `injector iptables`: options in, `iptables-restore`
input for the nat table out, with Istio's `istio-iptables` rules in REDIRECT mode. The command
(injector/commands/iptables.py) only runs it through `iptables-restore --noflush`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from injector.mesh import names
from injector.mesh.network import Cidr


def parse_id(text: str) -> int:
    """A numeric uid or gid."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()) or int(stripped) >= 2**32 - 1:
        raise ValueError(f"not a numeric uid/gid: {text!r}")
    return int(stripped)


def parse_mode(text: str) -> str:
    """The interception mode: REDIRECT, the only one implemented here. Istio's TPROXY is
    refused rather than silently done as REDIRECT (it keeps the caller's address, REDIRECT does
    not); NONE means no istio-init at all, so it never reaches this command."""
    stripped = text.strip()
    if stripped == names.INTERCEPTION_REDIRECT:
        return stripped
    if stripped == names.INTERCEPTION_TPROXY:
        raise ValueError("TPROXY is not supported: only REDIRECT is implemented")
    if stripped == names.INTERCEPTION_NONE:
        raise ValueError("NONE means no traffic capture: no istio-init, nothing to program")
    raise ValueError(f"unknown interception mode {text!r}: only REDIRECT")


def _join(values: tuple[object, ...] | None) -> str:
    return "*" if values is None else ",".join(str(value) for value in values)


@dataclass(frozen=True)
class TrafficOptions:
    """What `istio-iptables` is told, with Istio's defaults.

    `None` for an include list means `*` (everything).
    """

    proxy_port: int = names.PROXY_OUTBOUND_PORT
    inbound_capture_port: int = names.INBOUND_CAPTURE_PORT
    proxy_uid: int = names.PROXY_UID
    proxy_gid: int = names.PROXY_UID
    mode: str = names.INTERCEPTION_REDIRECT
    include_outbound_cidrs: tuple[Cidr, ...] | None = None
    exclude_outbound_cidrs: tuple[Cidr, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = field(default=names.DEFAULT_EXCLUDED_INBOUND_PORTS)
    exclude_outbound_ports: tuple[int, ...] = ()
    include_outbound_ports: tuple[int, ...] = ()
    # Interfaces whose traffic is never captured, in or out (Istio's -c).
    exclude_interfaces: tuple[str, ...] = ()
    # Virtual interfaces (a KubeVirt VM's) whose incoming traffic is the pod's outbound traffic,
    # captured like the pod's own (Istio's -k).
    reroute_virtual_interfaces: tuple[str, ...] = ()

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
        if self.reroute_virtual_interfaces:
            args += ["-k", _join(self.reroute_virtual_interfaces)]
        if self.exclude_interfaces:
            args += ["-c", _join(self.exclude_interfaces)]
        return args


# --- The rules -----------------------------------------------------------------------------------

# Our chains in the nat table. We own them: every run empties and refills them.
CAPTURE_CHAINS: tuple[str, ...] = ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT",
                                   "ISTIO_REDIRECT")

# The built-in chains we hook into, and the chain each one jumps to. These jumps are the only
# rules we write outside our own chains, so they are the only ones we ever delete there.
HOOKS: dict[str, str] = {"PREROUTING": "ISTIO_INBOUND", "OUTPUT": "ISTIO_OUTPUT"}


@dataclass(frozen=True)
class _Family:
    """What differs between the IPv4 and the IPv6 rules."""

    version: int
    # Where "localhost" calls go: apps and the proxy talking to each other explicitly.
    localhost: str
    # The source address the proxy binds for inbound passthrough connections to the app, so
    # that its own calls to the pod's address are told apart from the app's (Istio's 127.0.0.6).
    passthrough_source: str


_IPV4 = _Family(4, localhost="127.0.0.1/32", passthrough_source="127.0.0.6/32")
_IPV6 = _Family(6, localhost="::1/128", passthrough_source="::6/128")


def _of_family(cidrs: tuple[Cidr, ...], family: _Family) -> list[str]:
    """The networks of this family, as iptables-save shows them (host bits cleared)."""
    return [str(cidr.network) for cidr in cidrs if cidr.network.version == family.version]


def _interface_rules(options: TrafficOptions, family: _Family) -> list[str]:
    """The first rules of ISTIO_INBOUND, for traffic coming in on a named interface.

    Istio writes these into PREROUTING itself; here they open our own chain instead, which
    PREROUTING jumps to first, so that a second run replaces them rather than adding to them
    (only our chains are emptied). A RETURN from our chain goes on through PREROUTING, as
    Istio's RETURN from PREROUTING ends it: in a pod's network namespace nothing else is there.
    """
    rules = []
    # A virtual interface's traffic is outbound traffic of the pod: to the proxy's outbound
    # port when its destination is included (the excluded ranges do not apply, as in Istio).
    for interface in options.reroute_virtual_interfaces:
        if options.include_outbound_cidrs is None:
            rules.append(f"-A ISTIO_INBOUND -i {interface} -j ISTIO_REDIRECT")
        else:
            rules += [f"-A ISTIO_INBOUND -d {network} -i {interface} -j ISTIO_REDIRECT"
                      for network in _of_family(options.include_outbound_cidrs, family)]
        rules.append(f"-A ISTIO_INBOUND -i {interface} -j RETURN")
    rules += [f"-A ISTIO_INBOUND -i {interface} -j RETURN"
              for interface in options.exclude_interfaces]
    return rules


def _inbound_rules(options: TrafficOptions, family: _Family) -> list[str]:
    """Inbound TCP to the pod: to the inbound capture port, the excluded ports aside."""
    interface_rules = _interface_rules(options, family)
    if options.include_inbound_ports == ():
        # An empty include list turns inbound capture off: no hook at all, as in Istio, unless
        # a virtual interface's traffic is to be captured.
        if not options.reroute_virtual_interfaces:
            return []
        return ["-A PREROUTING -p tcp -j ISTIO_INBOUND", *interface_rules]
    rules = ["-A PREROUTING -p tcp -j ISTIO_INBOUND", *interface_rules]
    if options.include_inbound_ports is None:
        # `*`: every port, minus the exclusions (the proxy's own ports by default).
        rules += [f"-A ISTIO_INBOUND -p tcp -m tcp --dport {port} -j RETURN"
                  for port in options.exclude_inbound_ports]
        rules.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
    else:
        # An explicit list: only those ports; exclusions are moot, as in Istio.
        rules += [f"-A ISTIO_INBOUND -p tcp -m tcp --dport {port} -j ISTIO_IN_REDIRECT"
                  for port in options.include_inbound_ports]
    return rules


def _outbound_rules(options: TrafficOptions, family: _Family) -> list[str]:
    """Outbound TCP from the pod: to the proxy port, unless it must not be."""
    rules = ["-A OUTPUT -p tcp -j ISTIO_OUTPUT"]
    # Nothing sent out of an excluded interface is captured (Istio's RETURN in OUTPUT).
    rules += [f"-A ISTIO_OUTPUT -o {interface} -j RETURN"
              for interface in options.exclude_interfaces]
    # Excluded ports first: they bypass the proxy whoever calls, even the proxy calling itself.
    rules += [f"-A ISTIO_OUTPUT -p tcp -m tcp --dport {port} -j RETURN"
              for port in options.exclude_outbound_ports]
    # The proxy's inbound passthrough connections to the app come from 127.0.0.6 (::6): they
    # have been through the proxy already.
    rules.append(f"-A ISTIO_OUTPUT -s {family.passthrough_source} -o lo -j RETURN")
    # Istio only lets app-to-app loopback traffic (to the pod's own address) bypass the proxy
    # when the included ranges do not name a loopback address explicitly.
    included = options.include_outbound_cidrs or ()
    app_loopback_bypasses = not any(cidr.network.is_loopback for cidr in included)
    for kind, owner in (("uid", options.proxy_uid), ("gid", options.proxy_gid)):
        # The proxy calling the pod's own (non-localhost) address over loopback, e.g. an app
        # calling its own service VIP through the proxy: that call is inbound traffic.
        rules.append(f"-A ISTIO_OUTPUT ! -d {family.localhost} -o lo -m owner "
                     f"--{kind}-owner {owner} -j ISTIO_IN_REDIRECT")
        if app_loopback_bypasses:
            # Anyone else on loopback talks to the pod itself, not through the proxy.
            rules.append(f"-A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {owner} -j RETURN")
        # Everything else the proxy sends goes out as is, or it would loop back to itself.
        rules.append(f"-A ISTIO_OUTPUT -m owner --{kind}-owner {owner} -j RETURN")
    # Explicit localhost calls (app to sidecar, container to container) are never captured.
    rules.append(f"-A ISTIO_OUTPUT -d {family.localhost} -j RETURN")
    # Exclusions before inclusions: an excluded range inside an included one stays excluded.
    rules += [f"-A ISTIO_OUTPUT -d {network} -j RETURN"
              for network in _of_family(options.exclude_outbound_cidrs, family)]
    # Included ports are captured whatever the destination (Istio's includeOutboundPorts).
    rules += [f"-A ISTIO_OUTPUT -p tcp -m tcp --dport {port} -j ISTIO_REDIRECT"
              for port in options.include_outbound_ports]
    if options.include_outbound_cidrs is None:
        rules.append("-A ISTIO_OUTPUT -j ISTIO_REDIRECT")
    else:
        # Only the included ranges of this family; none means no outbound capture at all.
        rules += [f"-A ISTIO_OUTPUT -d {network} -j ISTIO_REDIRECT"
                  for network in _of_family(options.include_outbound_cidrs, family)]
    return rules


def build_rules(options: TrafficOptions, ipv6: bool = False) -> list[str]:
    """The `-A` lines for the nat table, in the canonical form `iptables-save` prints them."""
    parse_mode(options.mode)
    family = _IPV6 if ipv6 else _IPV4
    return [
        f"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {options.proxy_port}",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {options.inbound_capture_port}",
        *_inbound_rules(options, family),
        *_outbound_rules(options, family),
    ]


def find_installed_hooks(saved_nat_table: str) -> list[str]:
    """The rules in `iptables-save` output that jump from a built-in chain into ours.

    These are the `-A PREROUTING ... -j ISTIO_INBOUND` and `-A OUTPUT ... -j ISTIO_OUTPUT` rules
    an earlier run (ours or Istio's) left; a new run deletes them before adding its own so that
    running twice does not hook twice.
    """
    hooks = []
    for line in saved_nat_table.splitlines():
        words = line.split()
        if len(words) < 4 or words[0] != "-A" or words[1] not in HOOKS:
            continue
        jumps_to = [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("-j", "-g")]
        if HOOKS[words[1]] in jumps_to:
            hooks.append(line.strip())
    return hooks


def build_restore_input(
    options: TrafficOptions, ipv6: bool = False, installed_hooks: list[str] | None = None
) -> str:
    """The whole `iptables-restore --noflush` input (or `ip6tables-restore` with `ipv6`).

    With `--noflush`, iptables-restore leaves every rule it is not told about alone, and a
    declared user chain (`:ISTIO_OUTPUT - [0:0]`) is created, or emptied if it exists. So our
    chains are replaced wholesale and only the hooks from `installed_hooks` (see
    `find_installed_hooks`) are deleted: nobody else's rules are touched, and the whole change
    is committed at once.
    """
    rules = build_rules(options, ipv6)
    lines = [
        f"# injector iptables: Istio traffic capture, REDIRECT mode, IPv{6 if ipv6 else 4}",
        "*nat",
        *(f":{chain} - [0:0]" for chain in CAPTURE_CHAINS),
        *("-D" + hook[2:] for hook in installed_hooks or ()),
        *rules,
        "COMMIT",
    ]
    return "\n".join(lines) + "\n"


def has_global_ipv6_address(if_inet6: str) -> bool:
    """Whether `/proc/net/if_inet6` lists an IPv6 address of global scope (a dual-stack pod).

    Each line: address, interface index, prefix length, scope, flags, interface name; scope 00
    is global (link-local is 20, host/loopback 10). Loopback's own addresses do not count: ::6,
    added there for the proxy by an earlier IPv6 run, says nothing about the pod's network.
    """
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[3] == "00" and fields[5] != "lo":
            return True
    return False
