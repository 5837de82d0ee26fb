"""The HTTPS service's routes: the webhook, health, metrics, and whatever routers are mounted
(the CA's). The FastAPI app is built from already-loaded parts; `injector.commands.serve`
loads them and runs uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from injector import webhook
from injector.config import MeshConfig
from injector.metrics import ADMISSIONS, INJECTION_SECONDS

MAX_ADMISSION_BYTES = 8 * 1024 * 1024

log = logging.getLogger("injector.webhook")

# A readiness check returns None when ready, else why not.
ReadinessCheck = Callable[[], str | None]


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _json_error(message: str) -> bytes:
    return orjson.dumps({"error": message})


class Admission:
    """The webhook's answer to one request body, with its metrics and log line: the one
    implementation behind both the fast path and the FastAPI route."""

    def __init__(self, mesh: MeshConfig, namespace_labels: webhook.NamespaceLabels) -> None:
        self.mesh = mesh
        self.namespace_labels = namespace_labels
        self._counters: dict[tuple[str, str], Any] = {}

    def _count(self, result: str, reason: str) -> None:
        counter = self._counters.get((result, reason))
        if counter is None:
            counter = self._counters[(result, reason)] = ADMISSIONS.labels(result, reason)
        counter.inc()

    def too_large(self) -> tuple[int, bytes]:
        self._count("rejected", "too-large")
        return 413, _json_error(f"the body exceeds {MAX_ADMISSION_BYTES} bytes")

    def answer(self, body: bytes, started: float) -> tuple[int, bytes]:
        """HTTP status and JSON body; `started` is when the request arrived (perf_counter)."""
        try:
            review = webhook.parse(body)
        except webhook.BadReview as error:
            self._count("rejected", "bad-review")
            return 400, _json_error(str(error))
        outcome = webhook.admit(review, self.mesh, self.namespace_labels)
        elapsed = time.perf_counter() - started
        INJECTION_SECONDS.observe(elapsed)
        self._count(outcome.result, outcome.reason)
        log.info(
            "admission %s/%s %s (%s)", outcome.namespace, outcome.pod, outcome.result,
            outcome.reason,
            extra={"fields": {
                "namespace": outcome.namespace, "pod": outcome.pod, "result": outcome.result,
                "reason": outcome.reason, "duration_ms": round(elapsed * 1000, 3),
            }},
        )
        return 200, outcome.body


_JSON = (b"content-type", b"application/json")


class FastInject:
    """ASGI: `POST /inject` answered here, everything else by the FastAPI app (`.app`).

    The webhook is on the path of every pod creation. Starlette's routing, request object and
    middleware cost about as much per request as the injection itself (bench/bench_http.py),
    so the one hot route skips them; the answers are those of the FastAPI route, which stays
    for what is not a plain POST (405 for other methods, the redirect of /inject/).
    """

    def __init__(self, app: FastAPI, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["path"] != "/inject"
                or scope["method"] != "POST" or scope.get("root_path")):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            body = await self._body(scope, receive)
            if body is None:
                return  # the client went away: nobody to answer
            if body is BodyTooLarge:
                status, answer = self.admission.too_large()
            else:
                status, answer = self.admission.answer(body, started)
        except Exception:
            # A bug must not leak a traceback to the caller; the log keeps it.
            logging.getLogger("injector").exception("internal error")
            status, answer = 500, _json_error("internal error")
        await send({"type": "http.response.start", "status": status,
                    "headers": [_JSON, (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})

    @staticmethod
    async def _body(scope: Any, receive: Any) -> Any:
        """The body; BodyTooLarge (the class) past the limit; None if the client left."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > MAX_ADMISSION_BYTES:
                    return BodyTooLarge
                break
        message = await receive()
        if message["type"] != "http.request":
            return None
        body = message.get("body", b"")
        if not message.get("more_body", False):
            return body if len(body) <= MAX_ADMISSION_BYTES else BodyTooLarge
        chunks = [body]
        size = len(body)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_ADMISSION_BYTES:
                return BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)


def create_app(
    *,
    mesh: MeshConfig,
    namespace_labels: webhook.NamespaceLabels,
    readiness_checks: Sequence[ReadinessCheck] = (),
    degraded: Callable[[], list[str]] = list,
    routers: Sequence[APIRouter] = (),
    background: Sequence[Callable[[], Awaitable[None]]] = (),
) -> FastInject:
    """The ASGI app; `background` tasks (watchers) run while it serves and never block a
    request. `.app` is the FastAPI app behind the webhook's fast path.

    `readiness_checks` failing make /readyz 503; `degraded` parts (the Kubernetes API out of
    reach, say) are reported there but keep it 200: the webhook and the CA still work, and a
    replica taken out of its Service would stop every pod creation in the cluster.
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(job()) for job in background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="injector", version="0.1.0", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    admission = Admission(mesh, namespace_labels)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> Response:
        return error_response(error.status_code, str(error.detail), error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> Response:
        # A bug must not leak a traceback to the caller; the log keeps it.
        logging.getLogger("injector").exception("internal error")
        return error_response(500, "internal error")

    @app.post("/inject", response_class=Response)
    async def inject(request: Request) -> Response:
        # Reached only past FastInject (which answers POST /inject itself), e.g. in a test
        # that mounts the FastAPI app alone; the same answer either way.
        started = time.perf_counter()
        try:
            body = await read_body(request, MAX_ADMISSION_BYTES)
        except BodyTooLarge:
            status, answer = admission.too_large()
        else:
            status, answer = admission.answer(body, started)
        return Response(answer, status_code=status, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        problems = [problem for check in readiness_checks if (problem := check()) is not None]
        if problems:
            return JSONResponse({"status": "not ready", "reasons": problems}, status_code=503)
        degraded_parts = degraded()
        if degraded_parts:
            return JSONResponse({"status": "degraded", "degraded": degraded_parts})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return FastInject(app, admission)
