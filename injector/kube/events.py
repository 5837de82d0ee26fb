"""Kubernetes Events for what the webhook did that a user will want to see with
`kubectl get events` or `kubectl describe`: a sidecar injected, a pod refused (a malformed
annotation), or a pod skipped for a reason they may not expect (host network, an ignored
namespace, the mesh policy).

At admission the pod has no uid yet and may never exist (a refused one), so each Event is about
the pod's owner (its controller in `ownerReferences`: the ReplicaSet, Job, StatefulSet ...); a
pod without an owner gets none.

Never on the admission's critical path: `observe` (called once per answered admission, on the
event loop) does a few dictionary lookups and a non-blocking put into a bounded queue; a thread
of its own writes the Events, at a bounded rate, with deadlines. A full queue drops the Event,
a failed write is logged (once a minute at most) and forgotten: neither delays nor fails an
admission. Rate-limited twice over: one Event per owner and reason per window (a rollout of 100
replicas says "injected" once, not 100 times), and at most `WRITES_PER_SECOND` writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from injector.kube import client

log = logging.getLogger("injector.events")

QUEUE_SIZE = 256
WINDOW_SECONDS = 60.0
WRITES_PER_SECOND = 5.0
WRITE_BURST = 20
MAX_KEYS = 4096  # owners remembered for the window; forgotten all at once past this
MAX_MESSAGE_CHARS = 1024
MAX_NAME_CHARS = 200  # an owner name in generateName, leaving room for the random suffix
COMPONENT = "injector"
# A namespace's name, as Kubernetes allows it: anything else never reaches a request path.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
FAILURE_LOG_SECONDS = 60.0

# The skips a user may not expect from a pod that reached the webhook: the others (a pod or
# namespace that opted out, an already injected pod on reinvocation) are what they asked for.
SURPRISING_SKIPS: Mapping[str, str] = {
    "host-network": "it uses the host's network (spec.hostNetwork), which a sidecar cannot "
                    "redirect",
    "ignored-namespace": "its namespace is in the mesh config's ignoredNamespaces",
    "policy-disabled": "the mesh config's policy is disabled and nothing opted it in",
}


@dataclass(frozen=True)
class PendingEvent:
    namespace: str
    owner: Mapping[str, str]  # apiVersion, kind, name, uid
    reason: str  # the Event's reason: Injected, InjectionRefused, InjectionSkipped
    event_type: str  # Normal or Warning
    message: str


def _owner(metadata: Mapping[str, Any]) -> dict[str, str] | None:
    """The pod's controller (else its first owner), if it is well formed."""
    owners = metadata.get("ownerReferences")
    if not isinstance(owners, list) or not owners:
        return None
    chosen = next((o for o in owners if isinstance(o, dict) and o.get("controller") is True),
                  owners[0])
    if not isinstance(chosen, dict):
        return None
    fields = {key: chosen.get(key) for key in ("apiVersion", "kind", "name", "uid")}
    if not all(isinstance(value, str) and 0 < len(value) <= 253 for value in fields.values()):
        return None
    return fields  # type: ignore[return-value]


def _denial_message(body: bytes) -> str:
    try:
        status = orjson.loads(body)["response"]["status"]
        return str(status.get("message") or "refused")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "refused"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Events of one server process; `start` its writer, then hand `observe` to the app."""

    def __init__(self, rest: client.Rest, *, window_seconds: float = WINDOW_SECONDS,
                 writes_per_second: float = WRITES_PER_SECOND) -> None:
        self._rest = rest
        self._window = window_seconds
        self._rate = writes_per_second
        self._queue: queue.Queue[PendingEvent | None] = queue.Queue(QUEUE_SIZE)
        self._last: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()
        self.dropped = 0
        self.failed = 0
        self.written = 0

    # --- on the admission's path: cheap and never blocking ----------------------------------

    def observe(self, outcome: Any, review: Mapping[str, Any]) -> None:
        """Called with each answered admission (webhook.Outcome and the parsed review); never
        raises, never blocks."""
        try:
            self._observe(outcome, review)
        except Exception:
            # A bug here must cost an Event, never the admission.
            log.exception("events: cannot record an Event")

    def _observe(self, outcome: Any, review: Mapping[str, Any]) -> None:
        result, reason = outcome.result, outcome.reason
        if result == "injected":
            kind, event_type = "Injected", "Normal"
        elif result == "denied":
            kind, event_type = "InjectionRefused", "Warning"
        elif result == "skipped" and reason in SURPRISING_SKIPS:
            kind, event_type = "InjectionSkipped", "Normal"
        else:
            return
        request = review.get("request") or {}
        if request.get("dryRun") is True:
            return  # nothing is created: `injector check`'s dry runs among them
        pod = request.get("object")
        metadata = pod.get("metadata") if isinstance(pod, dict) else None
        owner = _owner(metadata) if isinstance(metadata, dict) else None
        if owner is None:
            return
        namespace = outcome.namespace
        if not _DNS_LABEL.fullmatch(namespace):
            return
        key = (namespace, owner["uid"], kind)
        now = time.monotonic()
        if now - self._last.get(key, -self._window) < self._window:
            return
        if len(self._last) >= MAX_KEYS:
            self._last.clear()
        self._last[key] = now
        pod_name = outcome.pod or "a pod"
        if kind == "Injected":
            message = f"sidecar injected into pod {pod_name} ({reason})"
        elif kind == "InjectionRefused":
            message = f"pod {pod_name} refused: {_denial_message(outcome.body)}"
        else:
            message = f"pod {pod_name} not injected: {SURPRISING_SKIPS[reason]} ({reason})"
        try:
            self._queue.put_nowait(PendingEvent(namespace, owner, kind, event_type,
                                                message[:MAX_MESSAGE_CHARS]))
        except queue.Full:
            self.dropped += 1

    @property
    def backlog(self) -> int:
        """Events waiting to be written (never more than QUEUE_SIZE)."""
        return self._queue.qsize()

    # --- the writer ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_forever, name="cluster-events",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    def _write_forever(self) -> None:
        tokens = float(WRITE_BURST)
        refilled = time.monotonic()
        last_failure_log = -FAILURE_LOG_SECONDS
        while not self._stop.is_set():
            pending = self._queue.get()
            if pending is None:
                continue
            now = time.monotonic()
            tokens = min(float(WRITE_BURST), tokens + (now - refilled) * self._rate)
            refilled = now
            if tokens < 1:
                self._stop.wait((1 - tokens) / self._rate)
                tokens = 1.0
                refilled = time.monotonic()
            tokens -= 1
            try:
                self._write(pending)
                self.written += 1
            except Exception as error:
                self.failed += 1
                if time.monotonic() - last_failure_log >= FAILURE_LOG_SECONDS:
                    last_failure_log = time.monotonic()
                    log.warning("events: cannot write an Event in %s (%d failed so far): %s",
                                pending.namespace, self.failed, client.describe(error))

    def _write(self, pending: PendingEvent) -> None:
        owner = pending.owner
        stamp = _now()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{owner['name'][:MAX_NAME_CHARS]}.",
                         "namespace": pending.namespace},
            "involvedObject": {**owner, "namespace": pending.namespace},
            "reason": pending.reason, "message": pending.message, "type": pending.event_type,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT, "reportingInstance": self._instance[:128],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        self._rest.json("POST", f"/api/v1/namespaces/{pending.namespace}/events", body=event,
                        timeout=(client.REQUEST_TIMEOUT[0], 5.0))
