"""The CA service in-process, with no transport: every refusal's kind and reason (which each
transport turns into its own status), the rate limit, the metrics, and the assembly from the
certificates directory and the mesh config."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import REGISTRY

from injector.ca import certsdir
from injector.ca.authn import (
    AuthenticationUnavailable,
    Authenticator,
    AuthenticatorChain,
    Caller,
    StaticTokens,
    token_digest,
)
from injector.ca.authority import Authority, cert_to_pem
from injector.ca.ratelimit import RateLimiter
from injector.ca.refusals import Refusal, RefusalKind
from injector.ca.service import (
    RETRY_AFTER_SECONDS,
    CAService,
    build_ca_service,
    internal_failure,
    record_refusal,
)
from injector.errors import ConfigError, InjectorError
from injector.mesh.config import load_mesh_config
from tests.support.certs import make_csr, p256, self_signed_authority

WEB = Caller("shop", "web", "static")
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
API_ID = "spiffe://cluster.local/ns/shop/sa/api"


class Unreachable:
    """Stands for TokenReview with the Kubernetes API down."""

    name = "unreachable"

    def authenticate(self, token: str) -> Caller | None:
        raise AuthenticationUnavailable("Kubernetes API unreachable (ConnectionError)")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return self_signed_authority()


def service(authority: Authority, *authenticators: Authenticator,
            rate_limiter: RateLimiter | None = None) -> CAService:
    """A service over `authenticators`; by default one static token, "web-token", for WEB."""
    web_token = StaticTokens({token_digest("web-token"): WEB})
    return CAService(authority, AuthenticatorChain(authenticators or [web_token]),
                     rate_limiter=rate_limiter)


def refusal_of(action: Callable[[], object]) -> Refusal:
    with pytest.raises(Refusal) as refused:
        action()
    assert refused.value.message and "\n" not in refused.value.message
    return refused.value


def refused_count(reason: str) -> float:
    return REGISTRY.get_sample_value("injector_ca_refusals_total", {"reason": reason}) or 0.0


# --- signing ------------------------------------------------------------------------------------

def test_issues_the_callers_svid(authority: Authority) -> None:
    cas = service(authority)
    issued_before = REGISTRY.get_sample_value("injector_ca_certificates_issued_total") or 0.0
    caller = cas.authenticate("Bearer web-token")
    svid = cas.issue(caller, make_csr(p256()).decode(), 3600)
    assert str(svid.spiffe_id) == WEB_ID
    lifetime = svid.certificate.not_valid_after_utc - svid.certificate.not_valid_before_utc
    assert lifetime == dt.timedelta(seconds=3600 + 60)
    assert REGISTRY.get_sample_value("injector_ca_certificates_issued_total") == \
        issued_before + 1


def test_the_trust_bundle_is_the_root(authority: Authority) -> None:
    assert service(authority).trust_bundle_pem() == cert_to_pem(authority.anchor).decode()


# --- refusals, by kind --------------------------------------------------------------------------

def _csr(**kwargs: object) -> str:
    return make_csr(p256(), **kwargs).decode()  # type: ignore[arg-type]


# Each case: what the caller does to a service knowing the static token "web-token".
REFUSALS: dict[str, tuple[Callable[[CAService], object], RefusalKind, str]] = {
    "no authorization": (lambda cas: cas.authenticate(None),
                         RefusalKind.UNAUTHENTICATED, "no_token"),
    "not a bearer token": (lambda cas: cas.authenticate("Basic web-token"),
                           RefusalKind.UNAUTHENTICATED, "no_token"),
    "an empty bearer token": (lambda cas: cas.authenticate("Bearer  "),
                              RefusalKind.UNAUTHENTICATED, "no_token"),
    "unknown token": (lambda cas: cas.authenticate("Bearer not-a-known-token"),
                      RefusalKind.UNAUTHENTICATED, "bad_token"),
    "another identity's SAN": (
        lambda cas: cas.issue(WEB, _csr(sans=[x509.UniformResourceIdentifier(API_ID)]), None),
        RefusalKind.FORBIDDEN, "identity_mismatch"),
    "an identity that cannot be a SPIFFE ID": (
        lambda cas: cas.issue(Caller("shop", "web/admin", "custom"), _csr(), None),
        RefusalKind.FORBIDDEN, "bad_identity"),
    "a TTL over the maximum": (lambda cas: cas.issue(WEB, _csr(), 90 * 86400 + 1),
                               RefusalKind.INVALID, "bad_ttl"),
    "garbage for a CSR": (lambda cas: cas.issue(WEB, "garbage", None),
                          RefusalKind.INVALID, "bad_csr"),
    "a weak key": (lambda cas: cas.issue(WEB, make_csr(rsa.generate_private_key(
        65537, 1024)).decode(), None), RefusalKind.INVALID, "weak_key"),
    "a CSR asking for a CA": (lambda cas: cas.issue(WEB, _csr(ask_ca=True), None),
                              RefusalKind.INVALID, "ca_requested"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_refusal_has_its_kind_and_reason(authority: Authority, case: str) -> None:
    action, kind, reason = REFUSALS[case]
    refusal = refusal_of(lambda: action(service(authority)))
    assert (refusal.kind, refusal.reason) == (kind, reason)
    assert refusal.retry_after_seconds is None  # nothing to wait for: the request must change


def test_a_refusal_is_one_of_ours(authority: Authority) -> None:
    refusal = refusal_of(lambda: service(authority).authenticate(None))
    assert isinstance(refusal, InjectorError)


def test_over_the_rate_is_exhausted_with_when_to_retry(authority: Authority) -> None:
    cas = service(authority, rate_limiter=RateLimiter(rate=0.5, burst=1))
    assert cas.authenticate("Bearer web-token") == WEB
    refusal = refusal_of(lambda: cas.authenticate("Bearer web-token"))
    assert (refusal.kind, refusal.reason) == (RefusalKind.EXHAUSTED, "rate_limited")
    assert refusal.retry_after_seconds == 2  # one request's worth comes back in 2 s
    assert "shop/web" in refusal.message


def test_the_api_down_is_unavailable_with_when_to_retry(authority: Authority) -> None:
    cas = service(authority, Unreachable())
    assert cas.authenticate_without_io("Bearer some-token") is None  # would block
    refusal = refusal_of(lambda: cas.authenticate("Bearer some-token"))
    assert (refusal.kind, refusal.reason) == (RefusalKind.UNAVAILABLE, "auth_unavailable")
    assert refusal.retry_after_seconds == 5
    assert "unreachable" in refusal.message


def test_an_expired_ca_is_unavailable_and_not_ready() -> None:
    now = dt.datetime.now(dt.UTC)
    short_lived = self_signed_authority(now, validity=dt.timedelta(hours=1))
    clock = [now]
    cas = CAService(short_lived, AuthenticatorChain([]), clock=lambda: clock[0])
    assert cas.readiness() is None
    clock[0] = now + dt.timedelta(hours=2)
    refusal = refusal_of(lambda: cas.issue(WEB, _csr(), None))
    assert (refusal.kind, refusal.reason) == (RefusalKind.UNAVAILABLE, "ca_expired")
    assert refusal.retry_after_seconds == RETRY_AFTER_SECONDS
    assert "expired" in (cas.readiness() or "")


# --- what every transport records ---------------------------------------------------------------

def test_refusals_are_counted_by_reason_and_logged_unless_about_credentials(
        caplog: pytest.LogCaptureFixture) -> None:
    before = refused_count("weak_key"), refused_count("bad_token")
    with caplog.at_level(logging.INFO, logger="injector.ca"):
        record_refusal(Refusal(RefusalKind.INVALID, "weak_key", "RSA key of 1024 bits"))
        record_refusal(Refusal(RefusalKind.UNAUTHENTICATED, "bad_token", "not valid"))
    assert (refused_count("weak_key"), refused_count("bad_token")) == (before[0] + 1,
                                                                     before[1] + 1)
    assert [record.getMessage() for record in caplog.records] == [
        "refused certificate request: weak_key (RSA key of 1024 bits)"]


def test_an_internal_failure_is_logged_and_answered_as_unavailable(
        caplog: pytest.LogCaptureFixture) -> None:
    before = refused_count("internal")
    with caplog.at_level(logging.INFO, logger="injector.ca"):
        try:
            raise RuntimeError("a bug")
        except RuntimeError:
            refusal = internal_failure()
    assert (refusal.kind, refusal.reason) == (RefusalKind.UNAVAILABLE, "internal")
    assert refusal.retry_after_seconds == RETRY_AFTER_SECONDS
    assert "a bug" not in refusal.message  # the log has it, not the caller
    assert refused_count("internal") == before + 1
    assert caplog.records[-1].exc_info is not None


# --- assembly -----------------------------------------------------------------------------------

def _tokens(path: Path) -> Path:
    path.write_text("- {token: web-token, namespace: shop, serviceAccount: web}\n")
    return path


def test_built_from_the_certs_dir_and_the_mesh_config(tmp_path: Path) -> None:
    certsdir.ensure_certs_dir(tmp_path / "certs")
    mesh = load_mesh_config({"defaultTtlSeconds": 600, "csrBurst": 4, "csrRatePerSecond": 0.01})
    cas = build_ca_service(certs_dir=tmp_path / "certs", mesh=mesh,
                           token_file=str(_tokens(tmp_path / "tokens.yaml")), token_reviewer=None,
                           workers=2)
    assert cas.trust_bundle_pem() == (tmp_path / "certs" / "root-cert.pem").read_text()
    svid = cas.issue(cas.authenticate("Bearer web-token"), _csr(), None)
    assert svid.expires_at - svid.certificate.not_valid_before_utc == dt.timedelta(seconds=660)
    # Each of the 2 workers allows half the burst of 4.
    cas.authenticate("Bearer web-token")
    refusal = refusal_of(lambda: cas.authenticate("Bearer web-token"))
    assert refusal.kind is RefusalKind.EXHAUSTED


def test_without_an_authenticator_every_caller_is_unauthenticated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    certsdir.ensure_certs_dir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="injector.ca"):
        cas = build_ca_service(certs_dir=tmp_path, mesh=load_mesh_config({}), token_file=None,
                               token_reviewer=None)
    assert "no authenticator" in caplog.text
    refusal = refusal_of(lambda: cas.authenticate("Bearer web-token"))
    assert (refusal.kind, refusal.reason) == (RefusalKind.UNAUTHENTICATED, "bad_token")


@pytest.mark.parametrize("setup", ["default over max TTL", "bad token file"])
def test_impossible_settings_are_a_config_error(tmp_path: Path, setup: str) -> None:
    certsdir.ensure_certs_dir(tmp_path / "certs")
    mesh, tokens = load_mesh_config({}), _tokens(tmp_path / "tokens.yaml")
    if setup == "default over max TTL":
        mesh = load_mesh_config({"defaultTtlSeconds": 7200, "maxTtlSeconds": 3600})
    else:
        tokens.write_text("- {token: x}\n")
    with pytest.raises(ConfigError) as error:
        build_ca_service(certs_dir=tmp_path / "certs", mesh=mesh, token_file=str(tokens),
                         token_reviewer=None)
    assert "\n" not in str(error.value)


def test_tokens_added_to_the_file_are_accepted_while_watching(tmp_path: Path) -> None:
    tokens = _tokens(tmp_path / "tokens.yaml")
    cas = CAService(self_signed_authority(), AuthenticatorChain([StaticTokens.from_file(tokens)]))

    async def accepted_once_reloaded() -> Caller:
        watcher = asyncio.create_task(cas.watch_token_file(interval_seconds=0.01))
        try:
            tokens.write_text(tokens.read_text()
                              + "- {token: new-token, namespace: new-team, serviceAccount: app}\n")
            while True:
                try:
                    return cas.authenticate("Bearer new-token")
                except Refusal:
                    await asyncio.sleep(0.01)
        finally:
            watcher.cancel()

    assert refusal_of(lambda: cas.authenticate("Bearer new-token")).reason == "bad_token"
    caller = asyncio.run(asyncio.wait_for(accepted_once_reloaded(), timeout=10))
    assert caller == Caller("new-team", "app", "static")
