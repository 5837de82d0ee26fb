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
    jwt_expiry,
    parse_service_account_username,
)


def _jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


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
