"""`injector serve` put together (injector.server.wiring): its TLS, the drain on SIGTERM, the
workers sharing the port, and a port it cannot listen on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.eventually import eventually
from tests.support.pods import pod, review
from tests.support.servers import Server, start_server, stopped


def tls12_handshake(server: Server, ciphers: str) -> str:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(server.root_cert)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(ciphers)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            client.wrap_socket(raw, server_hostname="localhost") as tls:
        cipher = tls.cipher()
    assert cipher is not None
    return cipher[0]


def test_weak_tls_1_2_suites_are_refused_to_openssl(server: Server) -> None:
    def handshake(cipher: str) -> str:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_2",
             "-cipher", cipher, "-CAfile", str(server.root_cert)],
            input="", capture_output=True, text=True, timeout=20, check=False).stdout

    assert "Cipher is ECDHE-ECDSA-AES128-GCM-SHA256" in handshake("ECDHE-ECDSA-AES128-GCM-SHA256")
    for weak in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA"):  # CBC, no AEAD
        assert "Cipher is (NONE)" in handshake(weak)


def test_weak_tls_1_2_suites_are_refused(server: Server) -> None:
    assert tls12_handshake(server, "ECDHE-ECDSA-AES128-GCM-SHA256") == (
        "ECDHE-ECDSA-AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        tls12_handshake(server, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")  # CBC only


def _read_reply(tls: ssl.SSLSocket) -> tuple[bytes, dict[str, object]]:
    """The status line and JSON body of one HTTP/1.1 reply with a Content-Length."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed mid-reply: {reply!r}"
        reply += chunk
    head, body = reply.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        chunk = tls.recv(65536)
        assert chunk, f"connection closed mid-body: {reply!r}"
        body += chunk
    return head.split(b"\r\n", 1)[0], json.loads(body)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_under_load_loses_no_in_flight_admission(tmp_path: Path, workers: str) -> None:
    server = start_server(tmp_path, "--workers", workers)
    in_flight = 24
    bodies = [json.dumps(review(pod(name=f"late-{index}"))).encode() for index in range(in_flight)]
    stop_load = threading.Event()

    def background_load() -> None:
        # Whole requests all along, so the signal lands on a busy server; those begun after
        # it may be refused (the listener is closed), which is not a loss.
        with contextlib.suppress(httpx.HTTPError), server.client() as client:
            while not stop_load.is_set():
                client.post("/inject", json=review(pod()))

    load = threading.Thread(target=background_load, daemon=True)
    try:
        load.start()
        connections = []
        for body in bodies:
            raw = socket.create_connection(("127.0.0.1", server.port), timeout=20)
            tls = server.ssl_context().wrap_socket(raw, server_hostname="localhost")
            tls.sendall(f"POST /inject HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                        + body[:200])
            connections.append(tls)
        time.sleep(0.3)  # the server is reading every one of these bodies
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        for tls, body in zip(connections, bodies, strict=True):
            tls.sendall(body[200:])
        for index, tls in enumerate(connections):
            status_line, answer = _read_reply(tls)
            tls.close()
            assert b" 200 " in status_line
            assert answer["response"]["uid"] == json.loads(bodies[index])["request"]["uid"]
            assert "patch" in answer["response"]
        assert server.process.wait(timeout=25) == 0
    finally:
        stop_load.set()
        load.join(timeout=10)
        server.stop()


INJECTED = 'injector_admission_requests_total{reason="namespace-enabled",result="injected"}'


def inject_on_a_new_connection(server: Server, name: str) -> httpx.Response:
    with server.client() as client:
        return client.post("/inject", json=review(pod(name=name)))


def test_every_worker_answers_and_metrics_count_them_all(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--workers", "2")
    try:
        pids = server.workers(2)
        for answering in pids:
            with stopped([pid for pid in pids if pid != answering]):
                for index in range(3):
                    answer = inject_on_a_new_connection(server, f"by-{answering}-{index}")
                    assert answer.status_code == 200 and "patch" in answer.json()["response"]
        # Whichever worker answers /metrics counts the other's admissions too.
        for answering in pids:
            with stopped([pid for pid in pids if pid != answering]), server.client() as client:
                assert f"{INJECTED} 6.0" in client.get("/metrics").text
    finally:
        server.stop()


def test_a_killed_worker_is_replaced_while_the_other_serves(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--workers", "2")
    try:
        victim, survivor = server.workers(2)
        os.kill(victim, signal.SIGKILL)
        assert inject_on_a_new_connection(server, "during").status_code == 200
        eventually(lambda: victim not in server.workers(2), interval=0.1,
                   what="the killed worker replaced")
        with stopped([survivor]):
            assert inject_on_a_new_connection(server, "by-the-new-one").status_code == 200
        assert "was killed by SIGKILL" in server.log()
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "injector", "serve", "--port", str(port),
                               "--certs-dir", str(tmp_path / "certs")],
                              capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"injector: cannot listen on 127.0.0.1:{port}: Address already in use")
