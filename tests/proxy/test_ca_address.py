"""The CA's address as the agent takes it: Istio's `host:port`, or an https URL, nothing else."""

from __future__ import annotations

import pytest

from injector.errors import ConfigError
from injector.proxy.ca_address import CaAddress, CaAddressError, parse_ca_address


@pytest.mark.parametrize(("text", "expected"), [
    ("injector.mesh-system.svc:443", CaAddress("injector.mesh-system.svc", 443)),
    ("injector.mesh-system.svc", CaAddress("injector.mesh-system.svc", 443)),
    ("https://ca.example:15017", CaAddress("ca.example", 15017)),
    ("https://ca.example/", CaAddress("ca.example", 443)),
    ("10.250.0.1:15017", CaAddress("10.250.0.1", 15017)),
    ("[fd00::1]:8443", CaAddress("fd00::1", 8443)),
    ("https://[::1]", CaAddress("::1", 443)),
    ("  ca:1  ", CaAddress("ca", 1)),
])
def test_ca_address_forms(text: str, expected: CaAddress) -> None:
    assert parse_ca_address(text) == expected


def test_ca_address_urls() -> None:
    assert parse_ca_address("[fd00::1]:8443").certificates_url == \
        "https://[fd00::1]:8443/v1/certificates"
    assert parse_ca_address("ca").base_url == "https://ca:443"


@pytest.mark.parametrize("text", ["", "http://ca:80", "ca:notaport", "ca:70000",
                                  "https://ca/v1/certificates", "https://:443", "ca:0",
                                  "https://user@ca", "[zz::1]:443"])
def test_bad_ca_addresses_are_refused(text: str) -> None:
    with pytest.raises(CaAddressError):
        parse_ca_address(text)


def test_a_bad_ca_address_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="only https:// is allowed"):
        parse_ca_address("http://ca:80")
