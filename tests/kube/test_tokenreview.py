"""TokenReview through the official client against the fake API server over HTTPS: the
authenticator's rules (audience, service accounts only, the cache) on real answers, and every
failure of the API a 'cannot decide now', never an 'unknown token'."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from injector.ca.authn import AuthenticationUnavailable, Caller, TokenReviewAuthenticator
from injector.kube.client import KubeConfigError, api_client
from injector.kube.tokenreview import KubeTokenReviewer
from tests.support.fakeapi import RunningFakeKube, TokenInfo, https_material, write_kubeconfig
from tests.support.servers import free_port


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def _reviewer(fake: RunningFakeKube, **kwargs: object) -> TokenReviewAuthenticator:
    client = api_client(str(fake.kubeconfig))
    assert client is not None
    return TokenReviewAuthenticator(KubeTokenReviewer(client), **kwargs)  # type: ignore[arg-type]


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
    client = api_client(str(down))
    assert client is not None
    with pytest.raises(AuthenticationUnavailable):
        reviewer = KubeTokenReviewer(client, request_timeout_seconds=2)
        TokenReviewAuthenticator(reviewer).authenticate("pod-token")


def test_tokenreview_api_failing_is_unavailable(fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    fake_kube.api.fail_with = 500
    with pytest.raises(AuthenticationUnavailable, match="HTTP 500"):
        _reviewer(fake_kube).authenticate("pod-token")


def test_the_api_servers_certificate_is_verified(tmp_path: Path,
                                                 fake_kube: RunningFakeKube) -> None:
    stranger = https_material(tmp_path / "other-ca").ca_pem
    wrong_ca = write_kubeconfig(tmp_path / "wrong-ca.kubeconfig", fake_kube.server.url, stranger)
    client = api_client(str(wrong_ca))
    assert client is not None
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    with pytest.raises(AuthenticationUnavailable):
        TokenReviewAuthenticator(KubeTokenReviewer(client)).authenticate("pod-token")


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


def test_kube_api_client_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert api_client(None) is None
    with pytest.raises(KubeConfigError, match="no such file"):
        api_client(str(tmp_path / "absent"))
    broken = tmp_path / "broken"
    broken.write_text("clusters: [\n")
    with pytest.raises(KubeConfigError) as error:
        api_client(str(broken))
    assert "\n" not in str(error.value)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubeConfigError, match="in-cluster"):
        api_client(None)  # no service account files outside a pod
