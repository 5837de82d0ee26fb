"""Bounded request bodies and JSON errors (injector.server.httpio), in-process: the ASGI `receive`
driven directly, so that what was read before a refusal can be counted."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from injector.server.httpio import (
    ERROR_SCHEMA,
    TOO_LARGE,
    error_response,
    json_error,
    json_responses,
    receive_body,
)

LIMIT = 100


class Client:
    """The ASGI `receive` of one request whose body comes in `chunks`; counts what was read."""

    def __init__(self, chunks: list[bytes], *, leaves: bool = False) -> None:
        self._messages: list[dict[str, Any]] = [
            {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
            for index, chunk in enumerate(chunks)]
        if leaves:  # the client goes away before its last chunk
            self._messages[-1] = {"type": "http.disconnect"}
        self.received = 0

    async def receive(self) -> dict[str, Any]:
        message = self._messages[self.received]
        self.received += 1
        return message


def scope(content_length: bytes | None = None) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", content_length))
    return {"type": "http", "method": "POST", "path": "/inject", "headers": headers}


def test_a_body_in_one_message_is_returned_whole() -> None:
    client = Client([b"x" * LIMIT])
    assert asyncio.run(receive_body(scope(b"%d" % LIMIT), client.receive, LIMIT)) == b"x" * LIMIT


def test_a_streamed_body_up_to_the_limit_is_joined() -> None:
    chunks = [b"a" * 40, b"b" * 40, b"c" * 20]
    client = Client(chunks)
    assert asyncio.run(receive_body(scope(), client.receive, LIMIT)) == b"".join(chunks)
    assert client.received == 3


def test_a_content_length_over_the_limit_is_refused_before_reading() -> None:
    client = Client([b"x" * (LIMIT + 1)])
    assert asyncio.run(receive_body(scope(b"%d" % (LIMIT + 1)), client.receive, LIMIT)) is TOO_LARGE
    assert client.received == 0


def test_a_streamed_body_over_the_limit_is_refused_while_streaming() -> None:
    # No Content-Length (chunked): the size is only known as the chunks come.
    client = Client([b"x" * 60, b"x" * 60, b"x" * 60, b"x" * 60])
    assert asyncio.run(receive_body(scope(), client.receive, LIMIT)) is TOO_LARGE
    assert client.received == 2  # the rest is never read


def test_a_body_longer_than_its_content_length_is_still_bounded() -> None:
    client = Client([b"x" * 60, b"x" * 60])
    assert asyncio.run(receive_body(scope(b"10"), client.receive, LIMIT)) is TOO_LARGE


def test_a_single_message_over_the_limit_is_refused() -> None:
    client = Client([b"x" * (LIMIT + 1)])
    assert asyncio.run(receive_body(scope(), client.receive, LIMIT)) is TOO_LARGE


@pytest.mark.parametrize("length", [b"", b"-1", b"ten", b"1e9"])
def test_a_content_length_that_is_not_a_number_leaves_the_check_to_the_body(
    length: bytes,
) -> None:
    assert asyncio.run(receive_body(scope(length), Client([b"{}"]).receive, LIMIT)) == b"{}"
    assert asyncio.run(receive_body(scope(length), Client([b"x" * (LIMIT + 1)]).receive,
                            LIMIT)) is TOO_LARGE


@pytest.mark.parametrize("chunks", [[b"never sent"], [b"x" * 10, b"never sent"]],
                         ids=["before-the-body", "mid-body"])
def test_a_client_that_leaves_gives_none(chunks: list[bytes]) -> None:
    client = Client(chunks, leaves=True)
    assert asyncio.run(receive_body(scope(), client.receive, LIMIT)) is None


def test_errors_are_json_with_one_error_field() -> None:
    assert orjson.loads(json_error('a "quoted" reason')) == {"error": 'a "quoted" reason'}
    response = error_response(413, "request body too large", {"retry-after": "5"})
    assert response.status_code == 413
    assert response.media_type == "application/json"
    assert response.headers["retry-after"] == "5"
    assert orjson.loads(response.body) == {"error": "request body too large"}


def test_the_openapi_responses_describe_the_error_shape() -> None:
    ok = {"type": "object"}
    responses = json_responses({400: "bad request", 413: "too large"}, ok)
    assert responses[200]["content"]["application/json"]["schema"] == ok
    for status, text in ((400, "bad request"), (413, "too large")):
        assert responses[status]["description"] == text
        assert responses[status]["content"]["application/json"]["schema"] == ERROR_SCHEMA
    assert 200 not in json_responses({400: "bad request"})
