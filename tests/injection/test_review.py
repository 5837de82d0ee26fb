"""The AdmissionReview types, and the OpenAPI document of `POST /inject` that derives from them:
what the app serves says what the types say, and what the webhook reads and writes fits it."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import jsonschema
import orjson
import pytest
from typing_extensions import is_typeddict

from injector.injection import review, webhook
from injector.mesh.config import MeshConfig
from injector.server.app import create_app
from tests.support.pods import pod
from tests.support.pods import review as review_of

MESH = MeshConfig()
JSON_TYPES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object",
              type(None): "null"}


@pytest.fixture(scope="module")
def inject_operation() -> dict[str, Any]:
    app = create_app(mesh=MESH, namespace_labels=lambda _: None)
    operation: dict[str, Any] = app.app.openapi()["paths"]["/inject"]["post"]
    return operation


@pytest.fixture(scope="module")
def request_schema(inject_operation: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = inject_operation["requestBody"]["content"]["application/json"][
        "schema"]
    return schema


@pytest.fixture(scope="module")
def response_schema(inject_operation: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = inject_operation["responses"]["200"]["content"][
        "application/json"]["schema"]
    return schema


def json_types(hint: Any) -> set[str]:
    """The JSON types a Python type hint allows (for the plain types the review uses)."""
    if get_origin(hint) in (Union, types.UnionType):
        return set().union(*(json_types(arg) for arg in get_args(hint)))
    if get_origin(hint) is Literal:
        return {JSON_TYPES[type(arg)] for arg in get_args(hint)}
    return {JSON_TYPES[get_origin(hint) or hint]}


def schema_types(schema: dict[str, Any]) -> set[str]:
    if "anyOf" in schema:
        return set().union(*(schema_types(option) for option in schema["anyOf"]))
    return {schema["type"]}


def assert_describes(schema: dict[str, Any], shape: Any, where: str) -> None:
    """`schema` has `shape`'s keys, required as in the TypedDict, each of its type."""
    hints = get_type_hints(shape)
    assert schema["type"] == "object", where
    assert set(schema["properties"]) == set(hints), where
    assert set(schema.get("required", ())) == shape.__required_keys__, where
    for key, hint in hints.items():
        prop, at = schema["properties"][key], f"{where}.{key}"
        assert "$ref" not in prop, f"{at}: a reference the OpenAPI document cannot resolve"
        if is_typeddict(hint):
            assert_describes(prop, hint, at)
            continue
        assert schema_types(prop) == json_types(hint), at
        if get_origin(hint) is Literal:
            assert set(prop.get("enum", [prop.get("const")])) == set(get_args(hint)), at


def test_the_served_request_schema_is_the_admission_review_type(
    request_schema: dict[str, Any]
) -> None:
    assert_describes(request_schema, review.AdmissionReview, "AdmissionReview")
    assert request_schema["properties"]["request"]["properties"]["uid"]["minLength"] == 1


def test_the_served_answer_schema_is_the_response_type(response_schema: dict[str, Any]) -> None:
    assert_describes(response_schema, review.AdmissionReviewResponse, "AdmissionReviewResponse")
    assert response_schema["properties"]["response"]["properties"]["patch"]["format"] == "byte"


def test_the_checks_use_the_types_values() -> None:
    assert set(get_args(review.ApiVersion)) == review.API_VERSIONS
    assert get_args(review.Kind) == (review.KIND,)
    assert get_args(review.PatchType) == (review.JSON_PATCH,)


@pytest.mark.parametrize("api_version", sorted(review.API_VERSIONS))
def test_reviews_as_kube_apiserver_sends_them_fit_the_schema(
    request_schema: dict[str, Any], api_version: str
) -> None:
    jsonschema.Draft202012Validator(request_schema).validate(
        review_of(pod(), api_version=api_version))


def test_a_review_without_a_uid_does_not_fit(request_schema: dict[str, Any]) -> None:
    body = review_of(pod())
    body["request"]["uid"] = ""
    assert not jsonschema.Draft202012Validator(request_schema).is_valid(body)


@pytest.mark.parametrize(
    ("obj", "kind"),
    [
        (pod(), "Pod"),  # injected: a patch
        (pod(labels={"sidecar.istio.io/inject": "false"}), "Pod"),  # skipped
        (pod(annotations={"sidecar.istio.io/proxyCPU": "lots"}), "Pod"),  # denied: a status
        ({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}},
         "Deployment"),  # ignored
    ],
)
def test_every_kind_of_answer_fits_the_schema(
    response_schema: dict[str, Any], obj: dict[str, Any], kind: str
) -> None:
    body = orjson.dumps(review_of(obj, kind=kind))
    outcome = webhook.admit(webhook.parse(body), MESH, lambda _: None)
    jsonschema.Draft202012Validator(response_schema).validate(orjson.loads(outcome.body))
