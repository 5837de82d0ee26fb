"""Plain ASGI routes in front of the FastAPI app, for the two hot paths.

`/inject` is on the path of every pod creation and `/v1/certificates` of every sidecar start
and renewal. Starlette's routing, Request object and middleware cost about as much per request
as the webhook's whole work (bench/bench_http.py), so these two are answered here; the FastAPI
app serves everything else, and still has their routes for what is not a plain POST (405 for
other methods, the redirect of a trailing slash). `/inject` goes further still: the connection
answers it without ASGI (injector.server.direct), and reaches its route here only when that
cannot (a request pipelined behind another, say).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson

Headers = list[tuple[bytes, bytes]]
# An answer: HTTP status, extra headers, JSON body; None when the client left mid-request.
Answer = tuple[int, Headers, bytes] | None
FastRoute = Callable[[Any, Any], Awaitable[Answer]]

_JSON = (b"content-type", b"application/json")


def header(scope: Any, name: bytes) -> str | None:
    """The first value of a request header (`name` lower-case), decoded as Starlette does."""
    for key, value in scope["headers"]:
        if key == name:
            decoded: str = value.decode("latin-1")
            return decoded
    return None


class FastRoutes:
    """ASGI: `routes` (by method and exact path) answered here, all else by `app`.

    `direct_routes` (by method and raw path) are answered by the connection itself, without
    ASGI (injector.server.direct); a request for one that reaches ASGI all the same (pipelined
    behind another, say) is answered by the route of `routes` for it, alike.
    """

    def __init__(self, app: Any, routes: Mapping[tuple[str, str], FastRoute],
                 direct_routes: Mapping[tuple[bytes, bytes], Any] | None = None) -> None:
        self.app = app
        self.routes = dict(routes)
        self.direct_routes = dict(direct_routes or {})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        route = None
        if scope["type"] == "http" and not scope.get("root_path"):
            route = self.routes.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            answer = await route(scope, receive)
        except Exception:
            # A bug must not leak a traceback to the caller; the log keeps it.
            logging.getLogger("injector").exception("internal error")
            answer = (500, [], orjson.dumps({"error": "internal error"}))
        if answer is None:
            return
        status, headers, body = answer
        await send({"type": "http.response.start", "status": status,
                    "headers": [_JSON, (b"content-length", b"%d" % len(body)), *headers]})
        await send({"type": "http.response.body", "body": body})
