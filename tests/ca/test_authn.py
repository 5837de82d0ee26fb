"""Authenticators: the static token file, and TokenReview through the official client against
the fake API server over HTTPS."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from injector.ca.authn import (
    AuthenticationUnavailable,
    AuthenticatorChain,
    Caller,
    StaticTokens,
    TokenFileError,
    TokenReviewAuthenticator,
    jwt_expiry,
    parse_service_account_username,
)
from injector.kube import client as kube
from tests.support.fakeapi import (
    RunningFakeKube,
    TokenInfo,
    https_material,
    write_kubeconfig,
)
from tests.support.servers import free_port


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def _reviewer(fake: RunningFakeKube, **kwargs: object) -> TokenReviewAuthenticator:
    client = kube.api_client(str(fake.kubeconfig))
    assert client is not None
    return TokenReviewAuthenticator(client, **kwargs)  # type: ignore[arg-type]


# --- static tokens ------------------------------------------------------------------------------

def test_static_tokens_map_each_token_to_its_service_account(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {token: t-shop, namespace: shop, serviceAccount: web}\n"
                    "- {token: t-pay, namespace: payments, serviceAccount: api.v2}\n")
    tokens = StaticTokens.from_file(path)
    assert tokens.authenticate("t-shop") == Caller("shop", "web", "static")
    assert tokens.authenticate("t-pay") == Caller("payments", "api.v2", "static")
    assert tokens.authenticate("t-sho") is None
    assert tokens.authenticate("") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{token: a}", "expected a list"),
        ("- [1, 2]", "expected a mapping"),
        ("- {token: '', namespace: a, serviceAccount: b}", "token must be"),
        ("- {token: s3cr3t-tok, namespace: a}", "serviceAccount must be"),
        ("- {token: s3cr3t-tok, namespace: a/b, serviceAccount: c}", "namespace 'a/b'"),
        ("- {token: s3cr3t-tok, namespace: '..', serviceAccount: c}", "namespace '..'"),
        ("- {token: s3cr3t-tok, namespace: a, serviceAccount: b, role: admin}",
         "unknown key 'role'"),
        ("- {token: s3cr3t-tok, namespace: a, serviceAccount: b}\n"
         "- {token: s3cr3t-tok, namespace: a, serviceAccount: c}", "two identities"),
        ("- {token: [unclosed", "not valid YAML"),
    ],
)
def test_a_bad_token_file_is_a_one_line_error(tmp_path: Path, content: str,
                                              message: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(TokenFileError, match=message) as error:
        StaticTokens.from_file(path)
    assert "\n" not in str(error.value)
    assert "s3cr3t-tok" not in str(error.value)  # a token is never echoed


def test_a_missing_token_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read"):
        StaticTokens.from_file(tmp_path / "absent.yaml")


def test_a_changed_token_file_is_reloaded_and_a_broken_one_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- {token: t-old, namespace: shop, serviceAccount: web}\n")
    tokens = StaticTokens.from_file(path)
    assert tokens.reload_if_changed() is False  # unchanged
    # A Secret update: the mounted file is replaced (a new inode), as the kubelet does.
    replacement = tmp_path / "tokens.new"
    replacement.write_text("- {token: t-new, namespace: shop, serviceAccount: api}\n")
    replacement.replace(path)
    assert tokens.reload_if_changed() is True
    assert tokens.authenticate("t-new") == Caller("shop", "api", "static")
    assert tokens.authenticate("t-old") is None  # revoked
    caplog.set_level(logging.INFO)
    path.write_text("- {token: t-half-writ")
    assert tokens.reload_if_changed() is False
    assert tokens.reload_if_changed() is False
    assert tokens.authenticate("t-new") == Caller("shop", "api", "static")  # still in force
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert warnings == [f"static tokens not reloaded: token file {path}: not valid YAML"]
    path.unlink()
    assert tokens.reload_if_changed() is False
    assert tokens.reload_if_changed() is False
    assert tokens.authenticate("t-new") == Caller("shop", "api", "static")
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno == logging.WARNING]
    assert len(warnings) == 2 and "cannot read" in warnings[1]  # once, not every poll
    assert "t-half-writ" not in caplog.text and "t-new" not in caplog.text


# --- TokenReview --------------------------------------------------------------------------------

def test_tokenreview_authenticates_a_service_account(fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    assert _reviewer(fake_kube).authenticate("pod-token") == Caller("shop", "web", "tokenreview")


def test_tokenreview_refuses_an_unknown_token(fake_kube: RunningFakeKube) -> None:
    assert _reviewer(fake_kube).authenticate("nobody-knows-me") is None


def test_tokenreview_refuses_a_token_for_another_audience(fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("api-token", "shop", "web",
                                            audiences=("https://kubernetes.default.svc",))
    assert _reviewer(fake_kube).authenticate("api-token") is None


def test_tokenreview_requires_the_audience_in_the_answer(fake_kube: RunningFakeKube) -> None:
    # An API server that says "authenticated" without confirming our audience is not trusted:
    # an empty status.audiences means the token is only good for the API server itself.
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    fake_kube.api.status_audiences_override = []
    assert _reviewer(fake_kube).authenticate("pod-token") is None
    fake_kube.api.status_audiences_override = ["something-else"]
    assert _reviewer(fake_kube).authenticate("pod-token") is None


@pytest.mark.parametrize("username", ["jane@example.com", "system:node:worker-1",
                                      "system:serviceaccount:shop", "system:serviceaccount::web",
                                      "system:serviceaccount:shop:web:extra"])
def test_tokenreview_refuses_what_is_not_a_service_account(fake_kube: RunningFakeKube,
                                                           username: str) -> None:
    fake_kube.api.tokens["user-token"] = TokenInfo(username)
    assert _reviewer(fake_kube).authenticate("user-token") is None


def test_tokenreview_api_down_is_unavailable_not_unauthenticated(tmp_path: Path,
                                                                 fake_kube: RunningFakeKube
                                                                 ) -> None:
    down = write_kubeconfig(tmp_path / "down.kubeconfig",
                            f"https://127.0.0.1:{free_port()}", fake_kube.ca_pem)
    client = kube.api_client(str(down))
    assert client is not None
    with pytest.raises(AuthenticationUnavailable):
        TokenReviewAuthenticator(client, request_timeout_seconds=2).authenticate("pod-token")


def test_tokenreview_api_failing_is_unavailable(fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    fake_kube.api.fail_with = 500
    with pytest.raises(AuthenticationUnavailable, match="HTTP 500"):
        _reviewer(fake_kube).authenticate("pod-token")


def test_the_api_servers_certificate_is_verified(tmp_path: Path,
                                                 fake_kube: RunningFakeKube) -> None:
    stranger = https_material(tmp_path / "other-ca").ca_pem
    wrong_ca = write_kubeconfig(tmp_path / "wrong-ca.kubeconfig", fake_kube.server.url, stranger)
    client = kube.api_client(str(wrong_ca))
    assert client is not None
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    with pytest.raises(AuthenticationUnavailable):
        TokenReviewAuthenticator(client).authenticate("pod-token")


def test_positive_answers_are_cached_briefly_and_not_past_the_token_expiry(
        fake_kube: RunningFakeKube) -> None:
    now = [1_000_000.0]
    reviewer = _reviewer(fake_kube, cache_seconds=60.0, clock=lambda: now[0])
    long_lived = _jwt({"exp": now[0] + 3600})
    short_lived = _jwt({"exp": now[0] + 10})
    for token in (long_lived, short_lived, "opaque"):
        fake_kube.api.add_service_account_token(token, "shop", "web")
    for token in (long_lived, short_lived, "opaque"):
        reviewer.authenticate(token)
        reviewer.authenticate(token)
    assert fake_kube.api.token_reviews() == 3  # each reviewed once, then cached

    now[0] += 20  # past the short-lived token's own expiry, within the cache time
    reviewer.authenticate(short_lived)
    reviewer.authenticate(long_lived)
    assert fake_kube.api.token_reviews() == 4

    now[0] += 50  # past the cache time
    del fake_kube.api.tokens[long_lived]  # revoked meanwhile
    assert reviewer.authenticate(long_lived) is None
    assert fake_kube.api.token_reviews() == 5


def test_negative_answers_are_not_cached(fake_kube: RunningFakeKube) -> None:
    reviewer = _reviewer(fake_kube)
    assert reviewer.authenticate("late-token") is None
    fake_kube.api.add_service_account_token("late-token", "shop", "web")
    assert reviewer.authenticate("late-token") == Caller("shop", "web", "tokenreview")


def test_tokens_are_never_logged(fake_kube: RunningFakeKube,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "very-secret-token-value"
    fake_kube.api.tokens[secret] = TokenInfo("jane")
    reviewer = _reviewer(fake_kube)
    reviewer.authenticate(secret)
    reviewer.authenticate(secret + "-unknown")
    assert secret not in caplog.text


# --- the chain ----------------------------------------------------------------------------------

class _Fixed:
    def __init__(self, name: str, answer: Caller | AuthenticationUnavailable | None) -> None:
        self.name = name
        self.answer = answer
        self.calls = 0

    def authenticate(self, token: str) -> Caller | None:
        self.calls += 1
        if isinstance(self.answer, AuthenticationUnavailable):
            raise self.answer
        return self.answer


def test_the_chain_tries_in_order_and_reports_unavailability_last() -> None:
    alice = Caller("a", "alice", "first")
    first, second = _Fixed("first", alice), _Fixed("second", Caller("b", "bob", "second"))
    assert AuthenticatorChain([first, second]).authenticate("t") == alice
    assert second.calls == 0

    down = _Fixed("down", AuthenticationUnavailable("down"))
    known = _Fixed("static", alice)
    # A token another authenticator knows does not need the one that is down.
    assert AuthenticatorChain([down, known]).authenticate("t") == alice
    with pytest.raises(AuthenticationUnavailable):
        AuthenticatorChain([_Fixed("static", None), down]).authenticate("t")
    assert AuthenticatorChain([_Fixed("static", None)]).authenticate("t") is None
    assert AuthenticatorChain([]).authenticate("t") is None


def test_helpers() -> None:
    assert parse_service_account_username("system:serviceaccount:ns:sa") == ("ns", "sa")
    assert jwt_expiry(_jwt({"exp": 1234})) == 1234.0
    assert jwt_expiry(_jwt({"exp": True})) is None
    assert jwt_expiry("not.a.jwt!") is None
    assert jwt_expiry("opaque") is None


def test_kube_api_client_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert kube.api_client(None) is None
    with pytest.raises(kube.KubeConfigError, match="no such file"):
        kube.api_client(str(tmp_path / "absent"))
    broken = tmp_path / "broken"
    broken.write_text("clusters: [\n")
    with pytest.raises(kube.KubeConfigError) as error:
        kube.api_client(str(broken))
    assert "\n" not in str(error.value)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(kube.KubeConfigError, match="in-cluster"):
        kube.api_client(None)  # no service account files outside a pod
