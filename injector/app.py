"""The HTTPS service's routes: the webhook, health, metrics, and whatever routers are mounted
(the CA's). The FastAPI app is built from already-loaded parts; `injector.commands.serve`
loads them and runs uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

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


def create_app(
    *,
    mesh: MeshConfig,
    namespace_labels: webhook.NamespaceLabels,
    readiness_checks: Sequence[ReadinessCheck] = (),
    degraded: Callable[[], list[str]] = list,
    routers: Sequence[APIRouter] = (),
    background: Sequence[Callable[[], Awaitable[None]]] = (),
) -> FastAPI:
    """The app; `background` tasks (watchers) run while it serves and never block a request.

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
        started = time.perf_counter()
        try:
            body = await read_body(request, MAX_ADMISSION_BYTES)
        except BodyTooLarge:
            ADMISSIONS.labels("rejected", "too-large").inc()
            return error_response(413, f"the body exceeds {MAX_ADMISSION_BYTES} bytes")
        try:
            review = webhook.parse(body)
        except webhook.BadReview as error:
            ADMISSIONS.labels("rejected", "bad-review").inc()
            return error_response(400, str(error))
        outcome = webhook.admit(review, mesh, namespace_labels)
        INJECTION_SECONDS.observe(time.perf_counter() - started)
        ADMISSIONS.labels(outcome.result, outcome.reason).inc()
        elapsed = time.perf_counter() - started
        log.info(
            "admission %s/%s %s (%s)", outcome.namespace, outcome.pod, outcome.result,
            outcome.reason,
            extra={"fields": {
                "namespace": outcome.namespace, "pod": outcome.pod, "result": outcome.result,
                "reason": outcome.reason, "duration_ms": round(elapsed * 1000, 3),
            }},
        )
        return Response(outcome.body, media_type="application/json")

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
    return app
