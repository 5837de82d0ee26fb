"""One certificate request as the agent makes it, against the real `injector serve`: what comes
back, and for each failure, the one log line and how long the agent waits before the next."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from injector.proxy.ca_address import CaAddress
from injector.proxy.caclient import (
    Attempt,
    CaClient,
    refusal_reason,
    retry_after_seconds,
    usable_token,
)
from injector.proxy.renewal import REFUSAL_MIN_DELAY, Backoff
from tests.support.eventually import eventually
from tests.support.hostile_ca import BAD_ANSWERS, HostileCA
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


# --- a CA that answers badly (issue 13) ----------------------------------------------------------

@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileCA]:
    ca = HostileCA(tmp_path)
    yield ca
    ca.stop()


def _hostile_client(tmp_path: Path, ca: HostileCA, **changes: Any) -> CaClient:
    token_file = tmp_path / "token"
    token_file.write_text(WEB_TOKEN)
    client = CaClient(ca=CaAddress("127.0.0.1", ca.port), token_file=token_file,
                      ca_root_file=ca.root_cert, trust_domain="cluster.local",
                      spiffe_id=WEB_ID, ttl_seconds=None)
    return replace(client, **changes)


def _in_thread(request: Callable[[], Attempt]) -> tuple[threading.Thread, list[Attempt]]:
    outcome: list[Attempt] = []
    thread = threading.Thread(target=lambda: outcome.append(request()))
    thread.start()
    return thread, outcome


def test_a_good_answer_from_another_ca_is_taken(tmp_path: Path, hostile: HostileCA) -> None:
    attempt = _hostile_client(tmp_path, hostile).request_certificate(_never_jitter())
    assert attempt.issued is not None and attempt.issued.spiffe_id == WEB_ID


@pytest.mark.parametrize("mode", [*BAD_ANSWERS, "huge", "deep-json", "not-json"])
def test_an_unusable_answer_is_one_line_and_a_growing_wait(
        tmp_path: Path, hostile: HostileCA, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="injector.agent")
    hostile.mode = mode
    client = _hostile_client(tmp_path, hostile)
    backoff = _never_jitter()
    delays = [client.request_certificate(backoff).retry_in for _ in range(3)]
    assert delays == [REFUSAL_MIN_DELAY, 2 * REFUSAL_MIN_DELAY, 4 * REFUSAL_MIN_DELAY]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3 and all("the CA's answer is unusable: " in line for line in lines)
    assert all("\n" not in line and len(line) < 400 for line in lines)


def test_a_trickling_ca_is_cut_off_at_the_deadline(tmp_path: Path, hostile: HostileCA,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Issue 13: one byte every 3 s kept one request going for over 65 s, despite its 5 s
    # timeout (a timeout per read); the deadline is for the whole request.
    caplog.set_level(logging.INFO, logger="injector.agent")
    hostile.mode, hostile.trickle_seconds = "trickle", 0.3
    client = _hostile_client(tmp_path, hostile, deadline_seconds=2.0)
    thread, outcome = _in_thread(lambda: client.request_certificate(_never_jitter()))
    thread.join(timeout=15)
    assert not thread.is_alive(), "the request outlived its deadline"
    [attempt] = outcome
    assert attempt.issued is None and attempt.retry_in == 0.5
    assert "sent no whole answer within 2s; not ready, retrying in 0.5s" in caplog.text


def test_a_request_in_flight_is_abandoned_when_told_to_stop(tmp_path: Path,
                                                            hostile: HostileCA) -> None:
    hostile.mode = "trickle"
    client = _hostile_client(tmp_path, hostile, deadline_seconds=120.0)
    stop = threading.Event()
    thread, outcome = _in_thread(lambda: client.request_certificate(_never_jitter(), stop))
    eventually(lambda: hostile.requests, 15, what="the request at the CA")
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive(), "still waiting on the CA 2 s after being told to stop"
    [attempt] = outcome
    assert attempt.issued is None
