"""TokenReview through the official client against the fake API server over HTTPS: the
authenticator's rules (audience, service accounts only, the cache) on real answers, and every
failure of the API a 'cannot decide now', never an 'unknown token'."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from injector.ca.authn import (
    MAX_TOKEN_LENGTH,
    NEEDS_IO,
    AuthenticationUnavailable,
    Caller,
    Rejected,
    TokenReviewAuthenticator,
)
from injector.kube.client import KubeConfigError, api_client
from injector.kube.tokenreview import KubeTokenReviewer
from tests.support.certs import make_csr, p256, request_svid
from tests.support.eventually import eventually
from tests.support.fakeapi import RunningFakeKube, TokenInfo, https_material, write_kubeconfig
from tests.support.servers import Server, free_port, start_server


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
    assert _reviewer(fake_kube).authenticate("nobody-knows-me") == Rejected(
        "the Kubernetes API did not authenticate it (invalid bearer token)")


def test_tokenreview_refuses_a_token_for_another_audience(fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("api-token", "shop", "web",
                                            audiences=("https://kubernetes.default.svc",))
    # The API server itself refuses a token for another audience, and says so.
    refused = _reviewer(fake_kube).authenticate("api-token")
    assert isinstance(refused, Rejected) and "audience" in refused.why


def test_tokenreview_requires_the_audience_in_the_answer(fake_kube: RunningFakeKube) -> None:
    # An API server that says "authenticated" without confirming our audience is not trusted:
    # an empty status.audiences means the token is only good for the API server itself.
    fake_kube.api.add_service_account_token("pod-token", "shop", "web")
    fake_kube.api.status_audiences_override = []
    assert isinstance(_reviewer(fake_kube).authenticate("pod-token"), Rejected)
    fake_kube.api.status_audiences_override = ["something-else"]
    assert isinstance(_reviewer(fake_kube).authenticate("pod-token"), Rejected)


@pytest.mark.parametrize("username", ["jane@example.com", "system:node:worker-1",
                                      "system:serviceaccount:shop", "system:serviceaccount::web",
                                      "system:serviceaccount:shop:web:extra"])
def test_tokenreview_refuses_what_is_not_a_service_account(fake_kube: RunningFakeKube,
                                                           username: str) -> None:
    fake_kube.api.tokens["user-token"] = TokenInfo(username)
    assert _reviewer(fake_kube).authenticate("user-token") == Rejected(
        "it is not a service account's token")


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
    assert isinstance(reviewer.authenticate(long_lived), Rejected)
    assert fake_kube.api.token_reviews() == 5


def test_negative_answers_are_cached_briefly(fake_kube: RunningFakeKube) -> None:
    # Issue 13: the same junk token sent 300 times was 300 TokenReviews.
    now = [1_000_000.0]
    reviewer = _reviewer(fake_kube, negative_cache_seconds=10.0, clock=lambda: now[0])
    for _ in range(5):
        assert isinstance(reviewer.authenticate("late-token"), Rejected)
    assert fake_kube.api.token_reviews() == 1
    fake_kube.api.add_service_account_token("late-token", "shop", "web")
    now[0] += 9
    # Still the answer of a moment ago:
    assert isinstance(reviewer.authenticate("late-token"), Rejected)
    now[0] += 1  # past the negative cache time: asked again
    assert reviewer.authenticate("late-token") == Caller("shop", "web", "tokenreview")
    assert fake_kube.api.token_reviews() == 2


def test_the_caches_are_bounded_and_junk_does_not_evict_good_answers(
        fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("good-token", "shop", "web")
    reviewer = _reviewer(fake_kube, max_cache_entries=4)
    assert reviewer.authenticate("good-token") is not None
    for index in range(10):
        assert isinstance(reviewer.authenticate(f"junk-{index}"), Rejected)
    reviews = fake_kube.api.token_reviews()
    assert reviews == 11
    assert reviewer.answer_without_io("good-token") == Caller("shop", "web", "tokenreview")
    # The newest junk is remembered:
    assert isinstance(reviewer.answer_without_io("junk-9"), Rejected)
    assert reviewer.answer_without_io("junk-0") is NEEDS_IO  # the oldest is not: bounded


def test_an_oversized_token_is_refused_without_a_review(fake_kube: RunningFakeKube) -> None:
    reviewer = _reviewer(fake_kube)
    assert isinstance(reviewer.authenticate("x" * (MAX_TOKEN_LENGTH + 1)), Rejected)
    assert fake_kube.api.token_reviews() == 0


def test_reviews_in_flight_are_bounded_and_the_cache_never_waits_for_them(
        fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("good-token", "shop", "web")
    client = api_client(str(fake_kube.kubeconfig))
    assert client is not None
    # A request timeout longer than the test: the held reviews end only when released.
    reviewer = TokenReviewAuthenticator(KubeTokenReviewer(client, request_timeout_seconds=60),
                                        max_concurrent_reviews=3)
    assert reviewer.authenticate("good-token") is not None  # cached from now on
    fake_kube.api.hold_token_reviews = True  # an API server that has stopped answering
    outcomes: list[str] = []

    def authenticate(token: str) -> None:
        try:
            answer = reviewer.authenticate(token)
            outcomes.append("rejected" if isinstance(answer, Rejected) else repr(answer))
        except AuthenticationUnavailable as error:
            outcomes.append(error.reason)

    threads = [threading.Thread(target=authenticate, args=(f"junk-{index}",))
               for index in range(10)]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: outcomes.count("tokenreview_busy") == 7
                   and fake_kube.api.token_reviews_in_flight == 3,
                   10, what="3 reviews held, 7 refused as busy")
        # A cached caller is answered at once while three reviews hang.
        assert reviewer.authenticate("good-token") == Caller("shop", "web", "tokenreview")
    finally:
        fake_kube.api.hold_token_reviews = False
        for thread in threads:
            thread.join(timeout=30)
    assert sorted(outcomes) == ["rejected"] * 3 + ["tokenreview_busy"] * 7
    assert fake_kube.api.token_reviews() == 4  # good-token once, then 3 junk ones
    assert fake_kube.api.token_reviews_peak == 3


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


# --- a flood of junk tokens against `injector serve` (issue 13) ---------------------------------

def _flood(server: Server, tokens: list[str], source: str, csr: str) -> list[httpx.Response]:
    """Every token at once, each on its own connection from the loopback address `source`."""

    async def send_all() -> list[httpx.Response]:
        transport = httpx.AsyncHTTPTransport(
            verify=server.ssl_context(), local_address=source,
            limits=httpx.Limits(max_connections=len(tokens)))
        async with httpx.AsyncClient(transport=transport, base_url=server.url,
                                     timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/certificates", json={"csr": csr},
                            headers={"Authorization": f"Bearer {token}"})
                for token in tokens))

    return asyncio.run(send_all())


def _from(source: str, server: Server, timeout: float = 10) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=timeout, transport=httpx.HTTPTransport(
        verify=server.ssl_context(), local_address=source))


def _settled(count: Callable[[], int]) -> Callable[[], bool]:
    """For `eventually`: true once `count` is positive and has not changed for ten looks."""
    seen: list[int] = []

    def check() -> bool:
        seen.append(count())
        return len(seen) >= 10 and seen[-1] > 0 and len(set(seen[-10:])) == 1

    return check


def test_junk_tokens_from_a_slow_api_never_hold_up_a_cached_caller(
        tmp_path: Path, fake_kube: RunningFakeKube) -> None:
    fake_kube.api.add_service_account_token("good-token", "shop", "web")
    server = start_server(tmp_path, "--kubeconfig", str(fake_kube.kubeconfig))
    csr = make_csr(p256()).decode()
    flood: list[httpx.Response] = []
    try:
        with _from("127.0.0.1", server) as good:
            assert request_svid(good, "good-token", csr).status_code == 200  # reviewed, cached
            fake_kube.api.hold_token_reviews = True  # the API server stops answering them
            sender = threading.Thread(target=lambda: flood.extend(_flood(
                server, [f"junk-{index}" for index in range(300)], "127.0.0.2", csr)))
            sender.start()
            try:
                eventually(_settled(lambda: fake_kube.api.token_reviews_in_flight), 30,
                           interval=0.1, what="the flood's reviews held at the API server")
                # Before issue 13 every worker thread hung in a review and this caller queued
                # behind the rest of the flood (a timeout here); now a cached answer needs no
                # thread, and comes at once.
                with _from("127.0.0.1", server, timeout=5) as prompt:
                    answered = request_svid(prompt, "good-token", csr)
                assert answered.status_code == 200, answered.text
                assert fake_kube.api.hold_token_reviews
            finally:
                fake_kube.api.hold_token_reviews = False
                sender.join(timeout=90)
            assert not sender.is_alive()

            # Refused (401), busy (503) or over the address's failure budget (429), each a JSON
            # error; never a 500, never a guess.
            statuses = Counter(response.status_code for response in flood)
            assert set(statuses) <= {401, 429, 503}, statuses
            assert all("error" in response.json() for response in flood)
            assert all(response.headers.get("retry-after") for response in flood
                       if response.status_code != 401)
            # Most were refused as busy rather than sent to the API server.
            assert fake_kube.api.token_reviews() < 1 + 300 // 2, fake_kube.api.token_reviews()

            # The same address keeps failing: its budget is spent, and what only a review could
            # check is refused (429) without asking the API server.
            with _from("127.0.0.2", server) as junk:
                reviews_before = fake_kube.api.token_reviews()
                answers = [request_svid(junk, f"more-junk-{index}", csr) for index in range(20)]
            assert answers[-1].status_code == 429, [answer.status_code for answer in answers]
            assert answers[-1].headers.get("retry-after")
            assert "too many failed authentications" in answers[-1].json()["error"]
            assert fake_kube.api.token_reviews() - reviews_before < 15
            # ... and another address is not held to that budget.
            with _from("127.0.0.3", server) as other:
                assert request_svid(other, "unknown-here", csr).status_code == 401
            assert request_svid(good, "good-token", csr).status_code == 200
    finally:
        fake_kube.api.hold_token_reviews = False
        server.stop()
    assert "junk-1" not in server.log() and "good-token" not in server.log()
