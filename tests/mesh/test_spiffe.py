"""SPIFFE IDs: built and parsed by one module that enforces the SPIFFE-ID syntax."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from injector.mesh.spiffe import SpiffeId, SpiffeIdError


def test_service_account_identity_round_trips() -> None:
    identity = SpiffeId.for_service_account("cluster.local", "shop", "web")
    assert str(identity) == "spiffe://cluster.local/ns/shop/sa/web"
    assert SpiffeId.parse(str(identity)) == identity
    assert identity.service_account == ("shop", "web")
    assert SpiffeId.parse("spiffe://example.org").path == ""
    assert SpiffeId.parse("spiffe://example.org/workload").service_account is None


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://Example.org/ns/a/sa/b",  # uppercase trust domain
        "SPIFFE://example.org/ns/a/sa/b",  # the scheme is lowercase
        "https://example.org/ns/a/sa/b",
        "spiffe:///ns/a/sa/b",  # empty trust domain
        "spiffe://example.org/",  # trailing slash
        "spiffe://example.org//a",  # empty segment
        "spiffe://example.org/ns/./sa/b",
        "spiffe://example.org/ns/../sa/b",
        "spiffe://example.org:8443/ns/a",  # port
        "spiffe://user@example.org/ns/a",  # user info
        "spiffe://example.org/ns/a?x=1",  # query
        "spiffe://example.org/ns/a#frag",  # fragment
        "spiffe://example.org/ns/a%20b",  # percent-encoding is not allowed
        "spiffe://exa mple.org/ns/a",
        "spiffe://example.org/ns/ä",
        "spiffe://" + "a" * 256 + "/x",  # trust domain over 255
        "spiffe://example.org/" + "a" * 2048,  # over 2048 in total
        "",
    ],
)
def test_invalid_ids_are_refused(text: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(text)


def test_length_limits_are_inclusive() -> None:
    SpiffeId.parse("spiffe://" + "a" * 255)
    prefix = "spiffe://example.org/"
    assert len(str(SpiffeId.parse(prefix + "a" * (2048 - len(prefix))))) == 2048


@pytest.mark.parametrize(("namespace", "account"), [("", "a"), ("a", ""), ("a/b", "c"),
                                                      ("..", "c"), ("a", "b c")])
def test_service_account_names_must_be_single_segments(namespace: str, account: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.for_service_account("cluster.local", namespace, account)


segment = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True).filter(
    lambda s: s not in (".", ".."))


@given(st.from_regex(r"[a-z0-9._-]{1,30}", fullmatch=True), st.lists(segment, max_size=5))
def test_every_valid_id_parses_back_to_itself(trust_domain: str, segments: list[str]) -> None:
    text = "spiffe://" + trust_domain + "".join("/" + s for s in segments)
    assert str(SpiffeId.parse(text)) == text
