"""The port and CIDR parsers that annotations, `injector iptables` flags, the mesh config and
the agent all share: what each accepts, and a clear refusal for the rest."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.mesh.network import (
    parse_cidr,
    parse_cidr_set,
    parse_cidrs,
    parse_port,
    parse_port_set,
    parse_ports,
)


@pytest.mark.parametrize("text", ["", "0", "65536", "-1", "http", "80a", "\u00b2", "1.5"])
def test_bad_ports_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a port"):
        parse_port(text)


def test_port_lists() -> None:
    assert parse_ports("80, 443,") == (80, 443)
    assert parse_ports("") == ()
    assert parse_port_set("*") is None
    assert parse_port_set("") == ()
    with pytest.raises(ValueError, match="not a port: '\\*'"):
        parse_ports("*")


def test_cidrs() -> None:
    assert parse_cidr("10.1.2.3/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_cidr("192.0.2.7") == ipaddress.ip_network("192.0.2.7/32")
    assert parse_cidr("fd00::/8") == ipaddress.ip_network("fd00::/8")
    assert parse_cidr_set("*") is None
    assert parse_cidrs("") == ()
    for bad in ("10.0.0.0/33", "10.0.0", "*", "example.org"):
        with pytest.raises(ValueError, match="not a CIDR"):
            parse_cidrs(bad)


@pytest.mark.parametrize("text", ["\uff18\uff10", "\u0668\u0660", "0" * 5000 + "80", "9" * 5000])
def test_ports_are_ascii_digits_and_short(text: str) -> None:
    # A 5,000-digit port used to reach int(), whose own error (or cost) is not ours to pass on.
    with pytest.raises(ValueError, match="not a port"):
        parse_port(text)


@pytest.mark.parametrize("text", ["\uff11\uff10.0.0.0/8", "10.0.0.0/\uff18", "fd00::/\u0668"])
def test_cidrs_are_ascii_digits(text: str) -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        parse_cidr(text)


def reference_cidr(text: str) -> object:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return "refused"


def ours(text: str) -> object:
    try:
        return parse_cidr(text)
    except ValueError:
        return "refused"


address_like = st.lists(st.sampled_from([*"0123456789abcdefABCDEF:./% \t", "\uff11",
                                          "%eth0", "::ffff:", "/0", "::", "1.2.3.4"]),
                        max_size=20).map("".join)


@settings(max_examples=3000, deadline=None)
@given(text=address_like | st.builds(str, st.ip_addresses()) | st.builds(
    lambda address, length: f"{address}/{length}", st.ip_addresses(),
    st.integers(0, 140).map(str) | st.sampled_from(["08", "00", "+8", "255.0.0.0", ""])))
def test_cidrs_are_read_exactly_as_ipaddress_reads_them(text: str) -> None:
    # parse_cidr reads common forms with inet_pton, for speed: it must agree with ipaddress.
    assert ours(text) == reference_cidr(text)
