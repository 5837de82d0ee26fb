"""The HTTPS service's routes: the webhook, health, metrics, and whatever routers are mounted
(the CA's). The FastAPI app is built from already-loaded parts; `injector.server.wiring`
loads them and runs uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from injector.injection import webhook
from injector.injection.review import AdmissionReview, AdmissionReviewResponse
from injector.mesh.config import MeshConfig
from injector.server import asgi, logs
from injector.server.answers import Answers, LabelsRead
from injector.server.httpio import (
    BUSY_HEADERS,
    BUSY_MESSAGE,
    BUSY_STATUS,
    Busy,
    TooLarge,
    error_response,
    json_error,
    json_responses,
    receive_body,
)
from injector.server.metrics import ADMISSIONS, INJECTION_SECONDS, exposition

MAX_ADMISSION_BYTES = 8 * 1024 * 1024
# What parsing a body costs grows with its JSON values, not its bytes: 8 MiB of tiny nested
# objects took orjson 0.9 s (holding the GIL, so no thread would help) and 380 MB, while
# /healthz waited. 100,000 values (about 45 ms at worst on a 2-vCPU VM) is many times what
# the largest pod etcd stores can hold.
MAX_ADMISSION_JSON_VALUES = 100_000

log = logging.getLogger("injector.webhook")

# A readiness check returns None when ready, else why not.
ReadinessCheck = Callable[[], str | None]
# Told of each answered admission (its outcome and the parsed review).
AdmissionObserver = Callable[[webhook.Outcome, Any], None]


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with each reference into its `$defs` replaced by the definition: a schema
    inside an OpenAPI operation cannot point into definitions of its own."""
    definitions = schema.pop("$defs", {})
    prefix = "#/$defs/"

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(prefix):
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            return {**inline(definitions[ref.removeprefix(prefix)]), **inline(siblings)}
        return {key: inline(value) for key, value in node.items()}

    inlined: dict[str, Any] = inline(schema)
    return inlined


@functools.cache
def inject_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON schemas of the review /inject reads and the review it answers, derived from
    the wire format's types (`injector.injection.review`) so the document cannot drift from
    the code. Made once, when the first app is built: never on a request's path, which checks
    only what injection reads (validating a whole review costs more than the injection)."""
    return (_inlined(TypeAdapter(AdmissionReview).json_schema()),
            _inlined(TypeAdapter(AdmissionReviewResponse).json_schema()))


def json_values_at_most(body: bytes) -> int:
    """How many JSON values (object keys included) `body` can hold at most, counted at
    memchr's speed before parsing: each opens an object or array, or follows a comma or a
    colon, or is the whole document. The same characters inside strings count too: never
    fewer than there are."""
    return (body.count(b",") + body.count(b":") + body.count(b"{") + body.count(b"[")
            + 1)


class Admission:
    """The webhook's answer to one request body, with its metrics and log line: the one
    implementation behind the direct route (injector.server.direct), the fast route and the
    FastAPI route."""

    max_body_bytes = MAX_ADMISSION_BYTES

    def __init__(self, mesh: MeshConfig, namespace_labels: webhook.NamespaceLabels,
                 observe: AdmissionObserver | None = None) -> None:
        self.mesh = mesh
        self.namespace_labels = namespace_labels
        self.observe = observe  # the cluster's Events (injector.kube.events): never blocks
        self._counters: dict[tuple[str, str], Any] = {}
        self.answers = Answers()

    def _count(self, result: str, reason: str) -> None:
        counter = self._counters.get((result, reason))
        if counter is None:
            counter = self._counters[(result, reason)] = ADMISSIONS.labels(result, reason)
        counter.inc()

    def too_large(self) -> tuple[int, bytes]:
        self._count("rejected", "too-large")
        return 413, json_error(f"the body exceeds {MAX_ADMISSION_BYTES} bytes")

    def busy(self) -> tuple[int, bytes]:
        self._count("rejected", "busy")
        return BUSY_STATUS, json_error(BUSY_MESSAGE)

    def answer(self, body: bytes, started: float) -> tuple[int, bytes]:
        """HTTP status and JSON body; `started` is when the request arrived (perf_counter)."""
        split = Answers.split(body)
        if split is not None:
            key, uid = split
            answered = self.answers.get(key, self.namespace_labels)
            if answered is not None:
                # A review answered before, but for its uid (injector.server.answers).
                answer = answered.head + uid + answered.tail
                self._report(answered.outcome, started, None, body, answer)
                return 200, answer
        # A body shorter than the limit cannot hold more values than it has bytes.
        if len(body) > MAX_ADMISSION_JSON_VALUES and (
                json_values_at_most(body) > MAX_ADMISSION_JSON_VALUES):
            self._count("rejected", "too-complex")
            return 413, json_error(
                f"the body holds more than {MAX_ADMISSION_JSON_VALUES} JSON values")
        try:
            review = webhook.parse(body)
        except webhook.BadReview as error:
            self._count("rejected", "bad-review")
            return 400, json_error(str(error))
        if split is None or not self.answers.seen_before(split[0]):
            outcome = webhook.admit(review, self.mesh, self.namespace_labels)
        else:
            labels = LabelsRead(self.namespace_labels)
            outcome = webhook.admit(review, self.mesh, labels)
            self.answers.put(split[0], split[1], body, review, outcome, labels)
        self._report(outcome, started, review, body)
        return 200, outcome.body

    def _report(self, outcome: webhook.Outcome, started: float, review: Any, body: bytes,
                answer: bytes | None = None) -> None:
        """The metrics, Events and log line of an admission: `outcome`, or when it was answered
        from memory (`answer`) the outcome remembered, whose review the Events parse again."""
        elapsed = time.perf_counter() - started
        INJECTION_SECONDS.observe(elapsed)
        self._count(outcome.result, outcome.reason)
        if self.observe is not None:
            if answer is None:
                self.observe(outcome, review)
            else:
                self.observe(webhook.Outcome(answer, *outcome[1:]), webhook.parse(body))
        logs.line(log, logging.INFO,
                  f"admission {outcome.namespace}/{outcome.pod} {outcome.result} "
                  f"({outcome.reason})",
                  {"namespace": outcome.namespace, "pod": outcome.pod, "result": outcome.result,
                   "reason": outcome.reason, "duration_ms": round(elapsed * 1000, 3)})

    async def route(self, scope: Any, receive: Any) -> asgi.Answer:
        """`POST /inject` as a fast route (injector.asgi)."""
        started = time.perf_counter()
        body = await receive_body(scope, receive, MAX_ADMISSION_BYTES)
        if body is None:
            return None  # the client went away: nobody to answer
        if isinstance(body, TooLarge):
            status, answer = self.too_large()
        elif isinstance(body, Busy):
            status, answer = self.busy()
            return status, BUSY_HEADERS, answer
        else:
            status, answer = self.answer(body, started)
        return status, [], answer


def create_app(
    *,
    mesh: MeshConfig,
    namespace_labels: webhook.NamespaceLabels,
    readiness_checks: Sequence[ReadinessCheck] = (),
    degraded: Callable[[], list[str]] = list,
    routers: Sequence[APIRouter] = (),
    fast_routes: Mapping[tuple[str, str], asgi.FastRoute] | None = None,
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
    observe_admission: AdmissionObserver | None = None,
) -> asgi.FastRoutes:
    """The ASGI app; `background` tasks (watchers) run while it serves and never block a
    request. `POST /inject` and the `fast_routes` (the CA's) skip FastAPI (injector.asgi);
    `.app` is the FastAPI app, which serves the rest.

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
    review_schema, answer_schema = inject_schemas()
    admission = Admission(mesh, namespace_labels, observe_admission)

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

    @app.post("/inject", response_class=Response,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": review_schema}}}},
              summary="The mutating admission webhook",
              responses=json_responses({400: "Not an AdmissionReview",
                                        413: "Over 8 MiB, or over 100,000 JSON values",
                                        503: "Too many bodies being read at once; retry"},
                                       ok=answer_schema))
    async def inject(request: Request) -> Response:
        # Reached only past FastRoutes (which answers POST /inject itself), e.g. in a test
        # that mounts the FastAPI app alone; the same answer either way.
        started = time.perf_counter()
        body = await receive_body(request.scope, request.receive, MAX_ADMISSION_BYTES)
        if body is None:
            return Response(status_code=400)  # the client went away: nobody reads this
        headers = None
        if isinstance(body, TooLarge):
            status, answer = admission.too_large()
        elif isinstance(body, Busy):
            status, answer = admission.busy()
            headers = {name.decode(): value.decode() for name, value in BUSY_HEADERS}
        else:
            status, answer = admission.answer(body, started)
        return Response(answer, status_code=status, media_type="application/json",
                        headers=headers)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", responses={503: {"description": "Not ready, with the reasons"}})
    async def readyz() -> JSONResponse:
        problems = [problem for check in readiness_checks if (problem := check()) is not None]
        if problems:
            return JSONResponse({"status": "not ready", "reasons": problems}, status_code=503)
        degraded_parts = degraded()
        if degraded_parts:
            return JSONResponse({"status": "degraded", "degraded": degraded_parts})
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text format"}})
    async def metrics() -> Response:
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return asgi.FastRoutes(app, {("POST", "/inject"): admission.route, **(fast_routes or {})},
                           direct_routes={(b"POST", b"/inject"): admission})
