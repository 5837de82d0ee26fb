"""The speed-of-light baselines for the HTTPS benchmarks, on `injector serve`'s own stack.

    python -m bench.echo_server raw|fastapi --port P --certs-dir DIR

Both serve `POST /inject` (and `GET /healthz`, to know they are up) with serve's uvicorn
settings and serve's TLS context (`injector.server.wiring.uvicorn_config` and
`server_tls_context`, the same functions), so that the only difference from `injector serve` is
the work done per request:

- `raw`: a bare ASGI app that reads the whole body and returns a fixed small JSON: the limit for
  Python on uvicorn, uvloop, httptools and this TLS;
- `fastapi`: a FastAPI route that reads the body, parses it with orjson and returns a fixed
  small JSON: the framework's floor.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from injector.server.wiring import server_tls_context, uvicorn_config

ANSWER = b'{"ok":true}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = bytearray()
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def fastapi_app() -> Any:
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.post("/inject", response_class=Response)
    async def inject(request: Request) -> Response:
        orjson.loads(await request.body())
        return Response(ANSWER, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(ANSWER, media_type="application/json")

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["raw", "fastapi"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certs-dir", type=Path, required=True)
    args = parser.parse_args()
    cert, key = args.certs_dir / "tls.crt", args.certs_dir / "tls.key"
    app = raw_app if args.kind == "raw" else fastapi_app()
    config = uvicorn_config(app, host="127.0.0.1", port=args.port,
                            tls=server_tls_context(cert, key), cert_path=cert, key_path=key)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
