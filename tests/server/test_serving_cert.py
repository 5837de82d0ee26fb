"""The serving certificate rotated without a restart (injector.server.serving_cert): a new pair
is served only once checked whole, in-process and through `injector serve` as a Secret update
would write it, one file at a time."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from injector.ca import authority, certsdir
from injector.server.serving_cert import ServingCertificate
from tests.support.eventually import eventually
from tests.support.servers import Server, start_server


def serving_certificate(certs: Path) -> ServingCertificate:
    certsdir.ensure_certs_dir(certs)
    return ServingCertificate(certs / "tls.crt", certs / "tls.key", certs / "root-cert.pem")


def later(path: Path) -> None:
    """Date `path` a second after it was: file times can be coarser than the few milliseconds
    a test takes, and the watcher tells a change by them."""
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def new_serving_pair(certs: Path) -> None:
    """A new serving certificate and key in `certs`, by the same CA."""
    for name in ("tls.crt", "tls.key"):
        (certs / name).unlink()
    certsdir.ensure_certs_dir(certs)
    for name in ("tls.crt", "tls.key"):
        later(certs / name)


def issue(certs: Path, *, now: dt.datetime | None = None,
          validity: dt.timedelta = dt.timedelta(days=30),
          self_signed: bool = False) -> tuple[bytes, bytes]:
    """A serving certificate and its key (PEM): by the directory's CA, or by itself."""
    key = authority.generate_key()
    now = now or dt.datetime.now(dt.UTC)
    if self_signed:
        cert = authority.make_root(key, trust_domain="elsewhere.local", now=now)
    else:
        cert = authority.make_serving_cert(
            key, issuer_cert=certsdir.read_certs(certs / "ca-cert.pem")[0],
            issuer_key=certsdir.read_key(certs / "ca-key.pem"), namespace="mesh-system",
            now=now, validity=validity)
    return authority.cert_to_pem(cert), authority.key_to_pem(key)


def write(certs: Path, *, cert: bytes | None = None, key: bytes | None = None) -> None:
    for name, data in (("tls.crt", cert), ("tls.key", key)):
        if data is not None:
            (certs / name).write_bytes(data)
            later(certs / name)


# Pairs a Secret update (or a mistake) can leave on disk, none of which may be served.
def cert_before_key(certs: Path) -> None:
    cert, _ = issue(certs)
    write(certs, cert=cert)  # the old key stays: they do not match


def truncated_key(certs: Path) -> None:
    cert, key = issue(certs)
    write(certs, cert=cert, key=key[: len(key) // 2])


def from_another_ca(certs: Path) -> None:
    cert, key = issue(certs, self_signed=True)
    write(certs, cert=cert, key=key)


def expired(certs: Path) -> None:
    cert, key = issue(certs, now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
                      validity=dt.timedelta(days=1))
    write(certs, cert=cert, key=key)


def empty_certificate(certs: Path) -> None:
    write(certs, cert=b"")


BROKEN: dict[str, Callable[[Path], None]] = {
    "cert-before-key": cert_before_key, "truncated-key": truncated_key,
    "from-another-ca": from_another_ca, "expired": expired, "empty-cert": empty_certificate,
}


def handshake_serial(server_context: ssl.SSLContext, root_cert: Path) -> int:
    """The serial of the certificate `server_context` presents in a real TLS handshake (in
    memory) with a client that trusts `root_cert`."""
    client_context = ssl.create_default_context(cafile=str(root_cert))
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(to_client, to_server, server_hostname="localhost")
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
        server_in.write(to_server.read())
        to_client.write(server_out.read())
        if all(done.values()):
            der = client.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number
    raise AssertionError("no handshake")


def test_an_unchanged_pair_is_not_loaded_again(tmp_path: Path) -> None:
    serving = serving_certificate(tmp_path / "certs")
    context = serving.current()
    assert serving.reload_if_changed() is False
    assert serving.current() is context
    assert serving.readiness() is None


@pytest.mark.parametrize("breakage", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_pair_keeps_the_live_context_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, breakage: Callable[[Path], None]
) -> None:
    certs = tmp_path / "certs"
    serving = serving_certificate(certs)
    live = serving.current()
    served = handshake_serial(live, certs / "root-cert.pem")
    breakage(certs)
    assert serving.reload_if_changed() is False
    assert serving.reload_if_changed() is False  # and said once, not at every poll
    assert serving.current() is live
    assert handshake_serial(live, certs / "root-cert.pem") == served
    assert len([r for r in caplog.records if "not reloaded" in r.getMessage()]) == 1
    assert serving.readiness() is None
    new_serving_pair(certs)
    assert serving.reload_if_changed() is True
    assert serving.current() is not live


def presented_serial(server: Server) -> int:
    context = server.ssl_context()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def on_disk_serial(certs: Path) -> int:
    return x509.load_pem_x509_certificate((certs / "tls.crt").read_bytes()).serial_number


def test_a_new_serving_certificate_on_disk_is_served_without_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        before = presented_serial(server)
        (server.certs_dir / "tls.crt").unlink()
        (server.certs_dir / "tls.key").unlink()
        subprocess.run([sys.executable, "-m", "injector", "certs", "init", "--certs-dir",
                        str(server.certs_dir)], check=True, timeout=60)
        on_disk = on_disk_serial(server.certs_dir)
        assert on_disk != before
        eventually(lambda: presented_serial(server) == on_disk, interval=0.2,
                   what="the new certificate served")
        assert server.process.poll() is None
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_a_broken_pair_on_disk_never_reaches_a_handshake(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    certs = server.certs_dir
    try:
        served = presented_serial(server)
        for count, (name, breakage) in enumerate(BROKEN.items(), start=1):
            breakage(certs)

            def refused(count: int = count) -> bool:
                return server.log().count("serving certificate not reloaded") >= count

            eventually(refused, what=f"{name}: the refusal logged")
            # Every new connection still gets the old pair, and is served.
            assert presented_serial(server) == served, name
            with server.client() as client:
                assert client.get("/healthz").status_code == 200, name
        time.sleep(4.5)  # two more polls of the files: nothing more to say about them
        assert server.log().count("serving certificate not reloaded") == len(BROKEN)
        # A whole pair, once written, is served.
        new_serving_pair(certs)
        eventually(lambda: presented_serial(server) == on_disk_serial(certs), interval=0.2,
                   what="the whole pair served")
    finally:
        server.stop()
