"""The rendered deploy/ base, once per module that asks for it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.deploy import DEPLOY, find, render


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(DEPLOY)


@pytest.fixture(scope="module")
def webhook_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objects, "MutatingWebhookConfiguration", "injector")
