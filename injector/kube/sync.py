"""The control plane's duties in a cluster, in the background, never in an admission's way.

- a watched cache of namespace labels for the injection decision;
- ConfigMap `istio-ca-root-cert` (the trust bundle pods mount) in every namespace that can get
  injected pods, recreated when deleted and corrected when changed;
- the MutatingWebhookConfiguration's `caBundle` kept equal to our root, so the API server's TLS
  to the webhook never breaks.

Every write is idempotent (create tolerates AlreadyExists, a patch that is already true changes
nothing), so two replicas running this side by side agree instead of fighting. All calls go
through the official client with deadlines; failures are retried with capped backoff and shown
as degraded in /readyz. (The root itself, shared by the replicas, is `ca_secret`'s, at start.)
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from injector.kube import client
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    NAMESPACE_LABEL,
    ROOT_CERT_CONFIGMAP,
    ROOT_CERT_KEY,
    webhook_configuration,
)

NAMESPACE_LABEL_VALUES = frozenset({"enabled", "disabled"})

WATCH_SECONDS = 240
MAX_BACKOFF_SECONDS = 30.0

# Named for the cluster, not the module: operators filter the log lines on it.
log = logging.getLogger("injector.cluster")


def gets_root_configmap(namespace: str, labels: Mapping[str, str], mesh: MeshConfig) -> bool:
    """Whether pods there may be injected, and so need the trust bundle: every namespace but the
    ignored ones and those that said no (a pod labelled `sidecar.istio.io/inject=true` in an
    unlabelled namespace is injected too, and must find its ConfigMap)."""
    return (
        namespace not in mesh.all_ignored_namespaces
        and labels.get(NAMESPACE_LABEL) != "disabled"
    )


class ClusterSync:
    """The duties above for one server process, each in a daemon thread of its own."""

    def __init__(self, api: ApiClient, *, root_pem: str, mesh: MeshConfig,
                 resync_seconds: float = 60.0, problems: Mapping[str, str] | None = None,
                 writer: bool = True) -> None:
        """`writer`: also keep the root ConfigMaps and the webhook's caBundle; with several
        workers (serve --workers) one of them does, all of them watch namespaces."""
        self._rest = client.Rest(api)
        self._writer = writer
        self._root_pem = root_pem
        self._mesh = mesh
        self._resync_seconds = resync_seconds
        self._labels: dict[str, dict[str, str]] = {}
        self._labels_lock = threading.Lock()
        self._namespaces_synced = threading.Event()
        self._pending: queue.Queue[str] = queue.Queue()
        self._problems: dict[str, str] = dict(problems or {})
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- what the rest of the server asks ---------------------------------------------------

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        """The namespace's labels, or None while the cache is not in sync with the API (then
        the webhook's namespaceSelector is trusted)."""
        if not self._namespaces_synced.is_set():
            return None
        with self._labels_lock:
            return self._labels.get(namespace)

    def degraded(self) -> list[str]:
        """What is not working right now; the webhook and the CA keep serving regardless."""
        return sorted(self._problems.values())

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        duties = [("namespaces", self._watch_namespaces)]
        if self._writer:
            duties += [("configmaps", self._watch_configmaps),
                       ("configmap-writer", self._write_configmaps),
                       ("webhook-ca-bundle", self._keep_ca_bundle)]
        for name, target in duties:
            thread = threading.Thread(target=target, name=f"cluster-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._pending.put("")

    # --- plumbing -----------------------------------------------------------------------------

    def _ok(self, part: str) -> None:
        if self._problems.pop(part, None) is not None:
            log.info("%s: working again", part)

    def _failed(self, part: str, what: str, error: BaseException) -> None:
        message = f"{part}: {what}: {client.describe(error)}"
        if self._problems.get(part) != message:
            log.warning(message)
        self._problems[part] = message

    def _retry_forever(self, part: str, what: str, step: Callable[[], None]) -> None:
        """Run `step` until stopped; after a failure wait with capped exponential backoff."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                step()
                backoff = 0.5
            except Exception as error:
                if not isinstance(error, client.API_ERRORS):
                    # A bug, or an answer we did not expect: keep the duty alive regardless.
                    log.exception("%s: unexpected failure", part)
                self._failed(part, what, error)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)

    def _list_then_watch(
        self, path: str, on_list: Callable[[list[dict[str, Any]]], None],
        on_event: Callable[[str, dict[str, Any]], None], selector: dict[str, str] | None = None,
    ) -> Iterator[None]:
        """List, then watch from the list's resourceVersion until the watch ends or fails."""
        listing = self._rest.json("GET", path, query=selector)
        on_list(listing.get("items") or [])
        yield
        query = {**(selector or {}), "watch": "true", "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(WATCH_SECONDS),
                 "resourceVersion": listing.get("metadata", {}).get("resourceVersion") or ""}
        response = self._rest.call("GET", path, query=query,
                                   timeout=(client.REQUEST_TIMEOUT[0], WATCH_SECONDS + 10))
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    return
                event = orjson.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    # Usually 410 Gone: our resourceVersion is too old; list again.
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("reason"))
                if kind != "BOOKMARK":
                    on_event(kind, obj)
        finally:
            response.release_conn()

    # --- namespaces ---------------------------------------------------------------------------

    def _labels_of(self, namespace: dict[str, Any]) -> dict[str, str]:
        metadata = namespace.get("metadata") or {}
        labels = dict(metadata.get("labels") or {})
        value = labels.get(NAMESPACE_LABEL)
        if value is not None and value not in NAMESPACE_LABEL_VALUES:
            log.warning("namespace %s: label %s=%r is neither enabled nor disabled; treated "
                        "as not opted in", metadata.get("name"), NAMESPACE_LABEL, value)
            del labels[NAMESPACE_LABEL]
        return labels

    def _namespace_listed(self, items: list[dict[str, Any]]) -> None:
        labels = {item["metadata"]["name"]: self._labels_of(item) for item in items}
        with self._labels_lock:
            self._labels = labels
        self._namespaces_synced.set()
        for name in labels:
            self._pending.put(name)

    def _namespace_changed(self, kind: str, namespace: dict[str, Any]) -> None:
        name = namespace["metadata"]["name"]
        with self._labels_lock:
            if kind == "DELETED":
                self._labels.pop(name, None)
            else:
                self._labels[name] = self._labels_of(namespace)
        if kind != "DELETED":
            self._pending.put(name)

    def _watch_namespaces(self) -> None:
        def step() -> None:
            try:
                for _ in self._list_then_watch("/api/v1/namespaces", self._namespace_listed,
                                               self._namespace_changed):
                    self._ok("namespaces")
            except Exception:
                # Until we have listed again the cache may be stale: trust the selector.
                self._namespaces_synced.clear()
                raise

        self._retry_forever("namespaces", "watching namespaces", step)

    # --- the root ConfigMaps ------------------------------------------------------------------

    def _configmaps_listed(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self._configmap_changed("LISTED", item)

    def _configmap_changed(self, kind: str, configmap: dict[str, Any]) -> None:
        if kind == "DELETED" or (configmap.get("data") or {}).get(
                ROOT_CERT_KEY) != self._root_pem:
            self._pending.put(configmap["metadata"]["namespace"])

    def _watch_configmaps(self) -> None:
        def step() -> None:
            for _ in self._list_then_watch(
                "/api/v1/configmaps",
                self._configmaps_listed,
                self._configmap_changed,
                {"fieldSelector": f"metadata.name={ROOT_CERT_CONFIGMAP}"},
            ):
                self._ok("configmap-watch")

        self._retry_forever("configmap-watch", f"watching {ROOT_CERT_CONFIGMAP} ConfigMaps", step)

    def _ensure_configmap(self, namespace: str) -> None:
        wanted = {ROOT_CERT_KEY: self._root_pem}
        configmaps = f"/api/v1/namespaces/{namespace}/configmaps"
        try:
            current = self._rest.json("GET", f"{configmaps}/{ROOT_CERT_CONFIGMAP}")
        except ApiException as error:
            if error.status != 404:
                raise
            body = {
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": namespace,
                             "labels": {"istio.io/config": "true"}},
                "data": wanted,
            }
            try:
                self._rest.json("POST", configmaps, body=body)
                log.info("created ConfigMap %s/%s", namespace, ROOT_CERT_CONFIGMAP)
            except ApiException as create_error:
                if create_error.status != 409:  # another replica was first
                    raise
            return
        if (current.get("data") or {}).get(ROOT_CERT_KEY) != self._root_pem:
            self._rest.json("PATCH", f"{configmaps}/{ROOT_CERT_CONFIGMAP}", body={"data": wanted},
                            content_type="application/merge-patch+json")
            log.info("updated ConfigMap %s/%s", namespace, ROOT_CERT_CONFIGMAP)

    def _write_configmaps(self) -> None:
        while not self._stop.is_set():
            try:
                namespace = self._pending.get(timeout=self._resync_seconds)
            except queue.Empty:
                # Nothing heard for a while: check every namespace again.
                with self._labels_lock:
                    for name in self._labels:
                        self._pending.put(name)
                continue
            if not namespace:
                continue
            with self._labels_lock:
                labels = self._labels.get(namespace)
            if labels is None or not gets_root_configmap(namespace, labels, self._mesh):
                continue
            try:
                self._ensure_configmap(namespace)
                self._ok("configmaps")
            except Exception as error:
                if isinstance(error, ApiException) and error.status == 404:
                    continue  # the namespace went away
                if not isinstance(error, client.API_ERRORS):
                    log.exception("configmaps: unexpected failure")
                self._failed("configmaps", f"writing {namespace}/{ROOT_CERT_CONFIGMAP}", error)
                self._stop.wait(1.0)
                self._pending.put(namespace)

    # --- the webhook's caBundle ---------------------------------------------------------------

    def _sync_ca_bundle(self) -> None:
        bundle = base64.b64encode(self._root_pem.encode()).decode()
        # Ours for this server's revision: `injector`, or `injector-<revision>` (each revision's
        # servers keep their own; a tag's webhooks live in the default or revision's one).
        name = webhook_configuration(self._mesh.revision)
        path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/" + name
        configuration = self._rest.json("GET", path)
        ops: list[dict[str, Any]] = []
        for index, webhook in enumerate(configuration.get("webhooks") or []):
            if (webhook.get("clientConfig") or {}).get("caBundle") != bundle:
                # The test guards against the list changing under us between read and patch.
                ops.append({"op": "test", "path": f"/webhooks/{index}/name",
                            "value": webhook.get("name")})
                ops.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle",
                            "value": bundle})
        if ops:
            self._rest.json("PATCH", path, body=ops, content_type="application/json-patch+json")
            log.info("patched the caBundle of MutatingWebhookConfiguration %s", name)

    def _keep_ca_bundle(self) -> None:
        def step() -> None:
            self._sync_ca_bundle()
            self._ok("webhook-ca-bundle")
            self._stop.wait(self._resync_seconds)

        self._retry_forever(
            "webhook-ca-bundle",
            f"keeping {webhook_configuration(self._mesh.revision)}'s caBundle", step)
