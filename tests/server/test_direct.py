"""`POST /inject` answered by the connection itself (injector.server.direct), over real TLS
sockets: what a caller sees is what the ASGI route answers, whatever the shape of the request
(query, pipelining, `Expect: 100-continue`, HTTP/1.0, a body in pieces or chunked)."""

from __future__ import annotations

import base64
import ssl
import time

import orjson

from tests.support import hostile
from tests.support.pods import pod, review
from tests.support.servers import Server


def admission(uid: str = "a-uid") -> bytes:
    """A typical pod's AdmissionReview, with its own uid."""
    document = review(pod())
    document["request"]["uid"] = uid
    return orjson.dumps(document)


def request(path: bytes, body: bytes, *, version: bytes = b"1.1",
            headers: bytes = b"") -> bytes:
    return (b"POST %s HTTP/%s\r\nhost: injector\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n" % (path, version, len(body), headers)) + body


def read_response(connection: ssl.SSLSocket, pending: bytearray) -> bytes:
    """One whole response (head and body, by its content-length) from `connection`; what was
    read past it stays in `pending`."""
    while b"\r\n\r\n" not in pending:
        chunk = connection.recv(65536)
        assert chunk, f"closed before a whole response: {bytes(pending)!r}"
        pending += chunk
    head, _, _ = bytes(pending).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    size = len(head) + 4 + length
    while len(pending) < size:
        chunk = connection.recv(65536)
        assert chunk, "closed within a response's body"
        pending += chunk
    response = bytes(pending[:size])
    del pending[:size]
    return response


def exchange(server: Server, data: bytes, answers: int = 1) -> list[bytes]:
    with hostile.tls(server.port, server.root_cert) as connection:
        connection.sendall(data)
        pending = bytearray()
        return [read_response(connection, pending) for _ in range(answers)]


def headers_of(response: bytes) -> dict[bytes, bytes]:
    head = response.partition(b"\r\n\r\n")[0]
    fields = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    return {name.lower(): value.strip() for name, _, value in fields}


def uid_of(response: bytes) -> str:
    answer = orjson.loads(hostile.body_of(response))
    uid: str = answer["response"]["uid"]
    return uid


def closed(connection: ssl.SSLSocket) -> bool:
    """Whether the server closes `connection` (within its timeout) once it has answered."""
    try:
        return connection.recv(65536) == b""
    except (ConnectionError, ssl.SSLError):
        return True


def test_the_direct_answers_are_the_asgi_routes_answers(server: Server) -> None:
    # A %-encoded path is decoded by uvicorn and served through ASGI: the same route, the
    # other way. The same status, headers (but for the date) and body, for every kind of answer.
    for body in (admission(), b"{not json", b'{"kind": "AdmissionReview"}'):
        direct, through_asgi = (exchange(server, request(path, body))[0]
                                for path in (b"/inject?timeout=10s", b"/inj%65ct?timeout=10s"))
        assert direct.partition(b"\r\n")[0] == through_asgi.partition(b"\r\n")[0]
        direct_headers, asgi_headers = headers_of(direct), headers_of(through_asgi)
        assert direct_headers.pop(b"date") and asgi_headers.pop(b"date")
        assert direct_headers == asgi_headers
        assert hostile.body_of(direct) == hostile.body_of(through_asgi)
    answer = orjson.loads(hostile.body_of(exchange(server, request(b"/inject", admission()))[0]))
    assert answer["response"]["allowed"] and base64.b64decode(answer["response"]["patch"])
    too_large = b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-length: 9000000\r\n\r\n"
    direct, through_asgi = (exchange(server, too_large.replace(b"/inject", path))[0]
                            for path in (b"/inject", b"/inj%65ct"))
    assert hostile.status_of(direct) == hostile.status_of(through_asgi) == 413
    assert hostile.body_of(direct) == hostile.body_of(through_asgi)


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    first, second = admission("first"), admission("second")
    answers = exchange(server, request(b"/inject", first)
                       + b"GET /healthz HTTP/1.1\r\nhost: injector\r\n\r\n"
                       + request(b"/inject", second), answers=3)
    assert [hostile.status_of(answer) for answer in answers] == [200, 200, 200]
    assert uid_of(answers[0]) == "first"
    assert orjson.loads(hostile.body_of(answers[1])) == {"status": "ok"}
    assert uid_of(answers[2]) == "second"


def test_expect_100_continue_is_answered_unless_the_body_is_refused(server: Server) -> None:
    body = admission()
    head = request(b"/inject", b"", headers=b"expect: 100-continue\r\n").replace(
        b"content-length: 0", b"content-length: %d" % len(body))
    with hostile.tls(server.port, server.root_cert) as connection:
        connection.sendall(head)
        pending = bytearray()
        assert read_response(connection, pending) == b"HTTP/1.1 100 Continue\r\n\r\n"
        connection.sendall(body)
        assert hostile.status_of(read_response(connection, pending)) == 200
    # Over 8 MiB by its length: refused at once, and the client need not send it.
    refused = exchange(server, b"POST /inject HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
                               b"content-length: 9000000\r\n\r\n")[0]
    assert hostile.status_of(refused) == 413


def test_http_1_0_and_connection_close_are_answered_then_closed(server: Server) -> None:
    body = admission()
    for data in (request(b"/inject", body, version=b"1.0"),
                 request(b"/inject", body, headers=b"connection: close\r\n")):
        with hostile.tls(server.port, server.root_cert, timeout=5) as connection:
            connection.sendall(data)
            answer = read_response(connection, bytearray())
            assert hostile.status_of(answer) == 200
            assert headers_of(answer)[b"connection"] == b"close"
            assert closed(connection)


def test_a_body_in_pieces_or_chunked_is_answered_whole(server: Server) -> None:
    body = admission("pieces")
    with hostile.tls(server.port, server.root_cert) as connection:
        whole = request(b"/inject", body)
        middle = len(whole) - len(body) // 2
        connection.sendall(whole[:middle])
        time.sleep(0.3)  # the first half read alone, held within the body budget
        connection.sendall(whole[middle:])
        answer = read_response(connection, bytearray())
    assert hostile.status_of(answer) == 200 and uid_of(answer) == "pieces"
    chunked = (b"POST /inject HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                          for part in (body[:100], body[100:]))
               + b"0\r\n\r\n")
    answer = exchange(server, chunked)[0]
    assert hostile.status_of(answer) == 200 and uid_of(answer) == "pieces"
