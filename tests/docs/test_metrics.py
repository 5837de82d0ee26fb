"""docs/metrics.md against a running server's /metrics: every metric it exports is documented,
with its type, and nothing documented is missing."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def exported(client: httpx.Client) -> dict[str, str]:
    """Metric name to type, from the exposition's TYPE lines; the client library's `_created`
    series set aside."""
    response = client.get("/metrics")
    assert response.status_code == 200
    found = {}
    for line in response.text.splitlines():
        match = re.match(r"^# TYPE (injector_\w+) (\w+)$", line)
        if match and not match[1].endswith("_created"):
            found[match[1]] = match[2]
    return found


def documented() -> dict[str, str]:
    found = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"^\| `(injector_\w+)` \| (\w+) \|", line)
        if match:
            found[match[1]] = match[2]
    return found


def test_every_exported_metric_is_documented_with_its_type(client: httpx.Client) -> None:
    assert documented() == exported(client)
