"""One certificate request as the agent makes it, against the real `injector serve`: what comes
back, and for each failure, the one log line and how long the agent waits before the next."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from injector.proxy.ca_address import CaAddress
from injector.proxy.caclient import (
    CaClient,
    refusal_reason,
    retry_after_seconds,
    usable_token,
)
from injector.proxy.renewal import REFUSAL_MIN_DELAY, Backoff
from tests.support.servers import WEB_TOKEN, Server, free_port

WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"


def _client(tmp_path: Path, ca_server: Server, token: str = WEB_TOKEN) -> CaClient:
    token_file = tmp_path / "token"
    token_file.write_text(token)
    return CaClient(ca=CaAddress("127.0.0.1", ca_server.port), token_file=token_file,
                    ca_root_file=ca_server.root_cert, trust_domain="cluster.local",
                    spiffe_id=WEB_ID, ttl_seconds=600)


def _never_jitter() -> Backoff:
    return Backoff(random=lambda: 0.0)


# --- what the CA's answers mean ------------------------------------------------------------------

def test_retry_after() -> None:
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds(None) == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert retry_after_seconds("99999") == 300.0


def test_refusal_reason_is_the_servers_one_line() -> None:
    assert refusal_reason(401, b'{"error": "the token is\\nnot valid"}') == \
        "HTTP 401: the token is not valid"
    assert refusal_reason(502, b"<html>bad gateway</html>") == "HTTP 502"


def test_a_token_must_fit_an_authorization_header() -> None:
    assert usable_token("  eyJhbGciOi.x-y_z=\n") == "eyJhbGciOi.x-y_z="
    for bad in ("", " \n", "two\nlines", "with space", "caf\u00e9", "tab\there"):
        assert usable_token(bad) is None


# --- requests to the real CA ---------------------------------------------------------------------

def test_a_granted_request_brings_the_svid_and_its_key(tmp_path: Path, ca_server: Server) -> None:
    backoff = _never_jitter()
    backoff.next_delay()  # an earlier failure: success forgets it
    attempt = _client(tmp_path, ca_server).request_certificate(backoff)
    assert attempt.issued is not None and attempt.retry_in == 0.0
    assert attempt.issued.spiffe_id == WEB_ID
    leaf = x509.load_pem_x509_certificate(attempt.issued.certificate_chain_pem.encode())
    key = serialization.load_pem_private_key(attempt.key_pem.encode(), None)
    assert key.public_key() == leaf.public_key()
    # The lifetime we asked for, counted from now (notBefore is backdated).
    remaining = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert 590 <= remaining.total_seconds() <= 600
    assert backoff.attempts == 0


def test_a_refusal_waits_at_least_the_refusal_delay_and_keeps_the_token_secret(
        tmp_path: Path, ca_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="injector.agent")
    attempt = _client(tmp_path, ca_server, token="not-a-known-token").request_certificate(
        _never_jitter())
    assert attempt.issued is None and attempt.retry_in >= REFUSAL_MIN_DELAY
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert "the CA refused the certificate request: HTTP 401" in record.getMessage()
    assert "not-a-known-token" not in caplog.text


def test_an_unreachable_ca_is_retried_with_backoff(tmp_path: Path, ca_server: Server,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="injector.agent")
    client = replace(_client(tmp_path, ca_server), ca=CaAddress("127.0.0.1", free_port()))
    attempt = client.request_certificate(_never_jitter())
    assert attempt.issued is None and attempt.retry_in == 0.5  # the first backoff, not 5 s
    assert "is unreachable" in caplog.text and "not ready, retrying in 0.5s" in caplog.text


def _assert_waits_the_refusal_delay(client: CaClient, caplog: pytest.LogCaptureFixture,
                                    expected: str) -> None:
    caplog.set_level(logging.INFO, logger="injector.agent")
    attempt = client.request_certificate(_never_jitter())
    assert expected in caplog.text
    assert attempt.issued is None and attempt.retry_in == REFUSAL_MIN_DELAY


def test_a_missing_token_file_waits_the_refusal_delay(
        tmp_path: Path, ca_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    client = _client(tmp_path, ca_server)
    client.token_file.unlink()
    _assert_waits_the_refusal_delay(client, caplog, "cannot read the token file")


def test_an_unusable_token_waits_the_refusal_delay(
        tmp_path: Path, ca_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    client = _client(tmp_path, ca_server, token="two\nlines")
    _assert_waits_the_refusal_delay(client, caplog, "holds no usable token")


def test_an_unloadable_ca_root_waits_the_refusal_delay(
        tmp_path: Path, ca_server: Server, caplog: pytest.LogCaptureFixture) -> None:
    bad_root = tmp_path / "bad-root.pem"
    bad_root.write_text("not a certificate")
    client = replace(_client(tmp_path, ca_server), ca_root_file=bad_root)
    _assert_waits_the_refusal_delay(client, caplog, "cannot load the CA root")
