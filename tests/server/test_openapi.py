"""Schemathesis against the service's own OpenAPI document, over HTTPS, for every endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.servers import WEB_TOKEN, Server


@pytest.fixture(scope="module")
def session(ca_server: Server) -> Iterator[requests.Session]:
    with requests.Session() as https:
        https.verify = str(ca_server.root_cert)
        https.headers["Authorization"] = f"Bearer {WEB_TOKEN}"
        yield https


# Every check but "schema-valid data is accepted": no JSON schema can say what a parseable CSR
# or an injectable pod is, so a schema-valid body may rightly get a 400. The rest hold: never a
# 5xx, only documented status codes and content types, responses matching their schemas.
def test_every_operation_holds_to_its_schema(ca_server: Server,
                                              session: requests.Session) -> None:
    schema = schemathesis.openapi.from_url(f"{ca_server.url}/openapi.json", verify=str(
        ca_server.root_cert))
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(operation.method.upper(), operation.path) for operation in operations}
    assert {("POST", "/inject"), ("POST", "/v1/certificates"), ("GET", "/v1/trust-bundle"),
            ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")} <= paths
    for operation in operations:
        strategy = operation.as_strategy()

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(case=strategy)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=ca_server.url, session=session,
                                   verify=str(ca_server.root_cert),
                                   excluded_checks=[positive_data_acceptance])

        check()
