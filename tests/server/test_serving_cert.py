"""The serving certificate rotated without a restart (injector.server.serving_cert): in-process,
and through `injector serve` as a Secret update would do it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from injector.ca import certsdir
from injector.server.serving_cert import ServingCertificate
from injector.server.wiring import server_tls_context
from tests.support.eventually import eventually
from tests.support.servers import Server, start_server


def serving_certificate(certs: Path) -> ServingCertificate:
    certsdir.ensure_certs_dir(certs)
    return ServingCertificate(server_tls_context(certs / "tls.crt", certs / "tls.key"),
                              certs / "tls.crt", certs / "tls.key")


def new_serving_pair(certs: Path) -> None:
    """A new serving certificate and key in `certs`, by the same CA, dated a second after the
    old ones: file times can be coarser than the few milliseconds this takes, and the watcher
    tells a change by them."""
    later = (certs / "tls.crt").stat().st_mtime_ns + 1_000_000_000
    for name in ("tls.crt", "tls.key"):
        (certs / name).unlink()
    certsdir.ensure_certs_dir(certs)
    for name in ("tls.crt", "tls.key"):
        os.utime(certs / name, ns=(later, later))


def test_an_unchanged_pair_is_not_loaded_again(tmp_path: Path) -> None:
    serving = serving_certificate(tmp_path / "certs")
    assert serving.reload_if_changed() is False
    assert serving.readiness() is None


def test_a_half_written_pair_keeps_the_old_one_until_it_is_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    certs = tmp_path / "certs"
    serving = serving_certificate(certs)
    key = (certs / "tls.key").read_bytes()
    new_serving_pair(certs)
    # The certificate written, the key not yet: they do not match.
    (certs / "tls.key").write_bytes(key)
    assert serving.reload_if_changed() is False
    assert "serving certificate not reloaded" in caplog.text
    assert serving.readiness() is None
    new_serving_pair(certs)
    assert serving.reload_if_changed() is True


def presented_serial(server: Server) -> int:
    context = server.ssl_context()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_a_new_serving_certificate_on_disk_is_served_without_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        before = presented_serial(server)
        (server.certs_dir / "tls.crt").unlink()
        (server.certs_dir / "tls.key").unlink()
        subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir",
                        str(server.certs_dir)], check=True, timeout=60)
        on_disk = x509.load_pem_x509_certificate(
            (server.certs_dir / "tls.crt").read_bytes()).serial_number
        assert on_disk != before
        eventually(lambda: presented_serial(server) == on_disk, interval=0.2,
                   what="the new certificate served")
        assert server.process.poll() is None
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()
