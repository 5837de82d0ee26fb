"""`injector check`'s reads of the cluster and its probes; the reasoning is
`injector.injection.explain`'s.

What is read: MutatingWebhookConfigurations, namespaces, pods, the webhook's Service and its
EndpointSlices (or Endpoints). What is probed:

- a webhook called by URL: a TLS handshake to it that trusts only the webhook's caBundle, which
  is what the API server does;
- every webhook of ours: a pod created with server-side dry run (`dryRun=All`, nothing is
  stored) in a namespace the webhook selects, so the API server itself calls it, through its
  Service, with its caBundle and its timeout. Its error, when it fails, is the one pod creation
  would meet (`failed calling webhook ...`), sorted here into what to do about it.

A webhook whose Service has no ready endpoints is not dry-run: the call could only time out.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from kubernetes.client.exceptions import ApiException

from injector.errors import InvalidInput, Unavailable
from injector.injection import explain
from injector.injection.explain import Finding, Report, Webhook
from injector.kube import client
from injector.mesh.config import MeshConfig
from injector.mesh.names import PROXY_CONTAINER, WEBHOOK_CONFIGURATION

WEBHOOKS_PATH = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
PROBE_SECONDS = 5.0
DRY_RUN_POD_PREFIX = "injector-check-"
DRY_RUN_ATTEMPTS = 3
# What the API server's message says when it could not call a webhook, and what it means.
_CALL_FAILURES: tuple[tuple[tuple[str, ...], str, str, str], ...] = (
    (("x509:", "certificate signed by unknown authority", "failed to verify certificate"),
     "ca-bundle-stale", "the API server does not trust the certificate the webhook serves",
     "the caBundle is not the injector's root: check the injector's log for its caBundle patch "
     "(RBAC: get and patch on mutatingwebhookconfigurations/injector), or restart it"),
    (("no endpoints available", "service unavailable"),
     "no-ready-endpoints", "the webhook's Service has no ready endpoints",
     "no injector pod is ready: kubectl -n NAMESPACE get pods -l app=injector, and see why"),
    (("connection refused", "no route to host", "connection reset"),
     "webhook-unreachable", "the API server cannot connect to the webhook",
     "the injector is not listening where the webhook points: check its pods and the Service's "
     "targetPort"),
    # After the others: the URL in the message carries `?timeout=10s` whatever went wrong.
    (("context deadline exceeded", "timed out", "i/o timeout", "deadline"),
     "webhook-timeout", "the webhook did not answer within its timeout",
     "the injector is overloaded or unreachable from the API server (a firewall between the "
     "control plane and the nodes on port 15017?); check its pods and their CPU"),
)


class CheckFailed(InvalidInput):
    """Something the check itself needs is missing (a pod, a namespace): one line, exit 2."""


class ClusterCheck:
    """The checks, against one cluster, with one mesh config."""

    def __init__(self, rest: client.Rest, mesh: MeshConfig,
                 our_configuration: str = WEBHOOK_CONFIGURATION) -> None:
        self._rest = rest
        self._mesh = mesh
        self._ours = our_configuration
        self._webhooks: list[Webhook] | None = None
        self._namespaces: dict[str, dict[str, Any]] | None = None

    # --- reads ------------------------------------------------------------------------------

    def _get(self, path: str, what: str, query: dict[str, str] | None = None
             ) -> dict[str, Any] | None:
        """The object at `path`, None when it does not exist; Unavailable when the API cannot
        be asked."""
        try:
            return self._rest.json("GET", path, query=query)
        except ApiException as error:
            if error.status == 404:
                return None
            raise Unavailable(f"reading {what}: {client.describe(error)}") from None
        except client.API_ERRORS as error:
            raise Unavailable(f"reading {what}: {client.describe(error)}") from None

    def webhooks(self) -> list[Webhook]:
        if self._webhooks is None:
            listing = self._get(WEBHOOKS_PATH, "MutatingWebhookConfigurations") or {}
            self._webhooks = explain.webhooks_of(listing.get("items") or [])
        return self._webhooks

    def namespaces(self) -> dict[str, dict[str, Any]]:
        if self._namespaces is None:
            listing = self._get("/api/v1/namespaces", "namespaces") or {}
            self._namespaces = {item["metadata"]["name"]: item
                                for item in listing.get("items") or []}
        return self._namespaces

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        found = self._get(f"/api/v1/namespaces/{_segment(namespace)}", f"namespace {namespace}")
        if found is None:
            raise CheckFailed(f"namespace {namespace} not found")
        return dict((found.get("metadata") or {}).get("labels") or {})

    # --- pods ---------------------------------------------------------------------------------

    def _explained(self, report: Report, pod: Mapping[str, Any], namespace: str) -> None:
        labels = self.namespace_labels(namespace)
        explanation = explain.explain(pod, namespace, labels, self._mesh, self.webhooks(),
                                      self._ours)
        report.explanations.append(explanation)
        report.findings.extend(explanation.findings)

    def check_manifest(self, pod: Mapping[str, Any], namespace: str) -> Report:
        """Would this pod, created now, be injected, and why."""
        report = Report("file")
        self._explained(report, pod, namespace)
        return report

    def check_namespace(self, namespace: str) -> Report:
        """Would a pod without labels or annotations, created there now, be injected."""
        report = Report("namespace")
        plain = {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "(a pod without labels)", "namespace": namespace},
                 "spec": {"containers": [{"name": "app", "image": "app"}]}}
        self._explained(report, plain, namespace)
        return report

    def check_pod(self, name: str, namespace: str) -> Report:
        """A stored pod: whether it would be injected if created now, and whether what it has
        is what it would get."""
        stored = self._get(f"/api/v1/namespaces/{_segment(namespace)}/pods/{_segment(name)}",
                           f"pod {namespace}/{name}")
        if stored is None:
            raise CheckFailed(f"pod {namespace}/{name} not found")
        report = Report("pod")
        labels = self.namespace_labels(namespace)
        explanation, findings = explain.pod_findings(stored, namespace, labels, self._mesh,
                                                     self.webhooks(), self._ours)
        report.explanations.append(explanation)
        report.findings.extend(explanation.findings)
        report.findings.extend(findings)
        return report

    def check_pods(self, namespace: str | None) -> Report:
        """Every pod still running (not Succeeded or Failed) in the namespace, or in all of
        them: those whose sidecar is missing, unwanted, of another revision or of an older
        template, i.e. what needs a rollout restart."""
        report = Report("pods")
        if namespace is not None:
            self.namespace_labels(namespace)  # fails plainly if it does not exist
            path = f"/api/v1/namespaces/{_segment(namespace)}/pods"
        else:
            path = "/api/v1/pods"
        listing = self._get(path, "pods") or {}
        namespaces = self.namespaces()
        checked = 0
        for pod in listing.get("items") or []:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            pod_namespace = (pod.get("metadata") or {}).get("namespace") or ""
            labels = ((namespaces.get(pod_namespace) or {}).get("metadata") or {}).get(
                "labels") or {}
            _, findings = explain.pod_findings(pod, pod_namespace, labels, self._mesh,
                                               self.webhooks(), self._ours)
            checked += 1
            report.findings.extend(f for f in findings if f.status != "ok")
        scope = f"namespace {namespace}" if namespace else "all namespaces"
        needing = len({f.subject for f in report.problems})
        report.findings.append(Finding(
            "pods-checked", "ok" if not needing else "info", scope,
            f"{checked} pod{'s' if checked != 1 else ''} checked, {needing} to create again"))
        return report

    # --- the webhooks ---------------------------------------------------------------------------

    def check_webhook(self) -> Report:
        report = Report("webhook")
        webhooks = self.webhooks()
        ours = [webhook for webhook in webhooks if webhook.is_ours(self._ours)]
        if not ours:
            report.findings.append(Finding(
                "webhook-missing", "problem", f"MutatingWebhookConfiguration {self._ours}",
                "does not exist (or has no webhooks): no pod is sent to the injector",
                "install it: kubectl apply -k deploy/, or helm install injector charts/injector"))
        for webhook in ours:
            report.findings.extend(self._check_one(webhook))
        namespaces = {name: dict((item.get("metadata") or {}).get("labels") or {})
                      for name, item in self.namespaces().items()}
        overlaps = explain.overlapping_webhooks(webhooks, namespaces)
        report.findings.extend(overlaps)
        if not overlaps:
            count = sum(1 for webhook in webhooks if webhook.is_injector())
            report.findings.append(Finding(
                "webhooks-exclusive", "ok", "injection webhooks",
                f"no namespace has a pod that {count} injection webhook"
                f"{'s' if count != 1 else ''} would inject twice"))
        return report

    def _check_one(self, webhook: Webhook) -> list[Finding]:
        subject = f"webhook {webhook.label}"
        found: list[Finding] = []
        bundle = webhook.client_config.get("caBundle")
        roots: str | None = None
        if not bundle:
            found.append(Finding(
                "ca-bundle-missing", "problem", subject,
                "has no caBundle: the API server cannot verify the injector, and pod creation "
                "it selects fails",
                "injector serve writes it at start: is it running, and may it patch "
                f"mutatingwebhookconfigurations/{webhook.configuration}? (see its log)"))
        else:
            try:
                roots = base64.b64decode(bundle, validate=True).decode("ascii")
                if "-----BEGIN CERTIFICATE-----" not in roots:
                    raise ValueError("no PEM certificate")
            except (ValueError, UnicodeDecodeError):
                roots = None
                found.append(Finding(
                    "ca-bundle-invalid", "problem", subject,
                    "its caBundle is not base64 of PEM certificates",
                    "remove the field; injector serve writes its root there"))
        service = webhook.client_config.get("service")
        url = webhook.client_config.get("url")
        reachable = True
        if isinstance(url, str) and roots is not None:
            finding = _probe_url(subject, url, roots)
            found.append(finding)
            reachable = finding.code != "webhook-unreachable"
        elif isinstance(service, dict):
            finding = self._endpoints(subject, service)
            found.append(finding)
            reachable = finding.status == "ok"
        if reachable and bundle:
            found.append(self._dry_run(webhook))
        return found

    def _endpoints(self, subject: str, service: Mapping[str, Any]) -> Finding:
        namespace, name = str(service.get("namespace") or ""), str(service.get("name") or "")
        where = f"Service {namespace}/{name}"
        found = self._get(f"/api/v1/namespaces/{_segment(namespace)}/services/{_segment(name)}",
                          where)
        if found is None:
            return Finding("service-missing", "problem", subject,
                           f"calls {where}, which does not exist",
                           "kubectl apply -k deploy/ (the Service is part of it)")
        ready = self._ready_endpoints(namespace, name)
        if not ready:
            selector = ",".join(f"{k}={v}" for k, v in
                                sorted(((found.get("spec") or {}).get("selector") or {}).items()))
            return Finding(
                "no-ready-endpoints", "problem", subject,
                f"{where} has no ready endpoints: the API server has nowhere to send pods, and "
                "their creation fails (`failed calling webhook ... no endpoints available` or "
                "`context deadline exceeded`)",
                f"kubectl -n {namespace} get pods -l {selector or '<the Service selector>'}: "
                "start the injector, or see why its pods are not ready (kubectl describe)")
        return Finding("endpoints-ready", "ok", subject,
                       f"{where} has {len(ready)} ready endpoint{'s' if len(ready) != 1 else ''}")

    def _ready_endpoints(self, namespace: str, name: str) -> list[str]:
        slices = self._get(
            f"/apis/discovery.k8s.io/v1/namespaces/{_segment(namespace)}/endpointslices",
            f"the EndpointSlices of Service {namespace}/{name}",
            query={"labelSelector": f"kubernetes.io/service-name={name}"}) or {}
        ready = [address for item in slices.get("items") or []
                 for endpoint in item.get("endpoints") or []
                 if (endpoint.get("conditions") or {}).get("ready") is not False
                 for address in endpoint.get("addresses") or []]
        if slices.get("items"):
            return ready
        # No EndpointSlice at all: an older cluster, or one that mirrors only Endpoints.
        endpoints = self._get(
            f"/api/v1/namespaces/{_segment(namespace)}/endpoints/{_segment(name)}",
            f"the Endpoints of Service {namespace}/{name}") or {}
        return [address.get("ip") or "" for subset in endpoints.get("subsets") or []
                for address in subset.get("addresses") or []]

    def _dry_run_targets(self, webhook: Webhook) -> list[tuple[str, dict[str, str]]]:
        """Namespaces and pod labels for which the API server calls this webhook, those where
        it is the only injection webhook called first."""
        injectors = [w for w in self.webhooks() if w.is_injector()]
        variants = explain.pod_label_variants([webhook])
        alone: list[tuple[str, dict[str, str]]] = []
        shared: list[tuple[str, dict[str, str]]] = []
        for name, item in sorted(self.namespaces().items()):
            if (item.get("status") or {}).get("phase") == "Terminating":
                continue
            labels = dict((item.get("metadata") or {}).get("labels") or {})
            for pod_labels in variants:
                match = explain.webhook_matches(webhook, name, labels, pod_labels, self._ours)
                if not match.called:
                    continue
                others = [w for w in injectors if w is not webhook and explain.webhook_matches(
                    w, name, labels, pod_labels, self._ours).called]
                (shared if others else alone).append((name, pod_labels))
                break
        return alone + shared

    def _dry_run(self, webhook: Webhook) -> Finding:
        subject = f"webhook {webhook.label}"
        targets = self._dry_run_targets(webhook)
        if not targets:
            return Finding("dry-run-skipped", "info", subject,
                           "not dry-run: no namespace is selected by it yet")
        # A pod can be refused before the webhook is called for reasons of its namespace (no
        # ServiceAccount yet, a quota, Pod Security): then the next namespace is tried.
        for namespace, labels in targets[:DRY_RUN_ATTEMPTS]:
            finding = self._dry_run_in(webhook, namespace, labels)
            if finding.code != "dry-run-refused":
                break
        return finding

    def _dry_run_in(self, webhook: Webhook, namespace: str, labels: dict[str, str]) -> Finding:
        subject = f"webhook {webhook.label}"
        timeout = float(webhook.spec.get("timeoutSeconds") or 10)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": DRY_RUN_POD_PREFIX, "labels": labels},
               "spec": {"containers": [{"name": "check", "image": "injector-check"}]}}
        started = time.monotonic()
        try:
            created = self._rest.json(
                "POST", f"/api/v1/namespaces/{_segment(namespace)}/pods",
                query={"dryRun": "All"}, body=pod,
                timeout=(client.REQUEST_TIMEOUT[0], timeout + 10))
        except ApiException as error:
            return _call_failure(subject, webhook, namespace, error)
        except client.API_ERRORS as error:
            raise Unavailable(f"dry-run pod in {namespace}: {client.describe(error)}") from None
        elapsed = time.monotonic() - started
        names = [c.get("name") for part in ("containers", "initContainers")
                 for c in (created.get("spec") or {}).get(part) or []]
        injected = "injected" if PROXY_CONTAINER in names else "answered (not injected)"
        if elapsed > timeout:
            return Finding("webhook-slow", "problem", subject,
                           f"a dry-run pod in {namespace} took {elapsed:.1f} s, over the "
                           f"webhook's timeout of {timeout:g} s",
                           "the injector is overloaded: add replicas or CPU")
        return Finding("dry-run", "ok", subject,
                       f"a dry-run pod in namespace {namespace} was {injected} in "
                       f"{elapsed:.2f} s (timeout {timeout:g} s)")


def _call_failure(subject: str, webhook: Webhook, namespace: str, error: ApiException
                  ) -> Finding:
    message = _api_message(error)
    if webhook.name not in message:
        return Finding("dry-run-refused", "info", subject,
                       f"a dry-run pod in namespace {namespace} was refused before it was "
                       f"decided by this webhook: {message}")
    lowered = message.lower()
    for markers, code, meaning, fix in _CALL_FAILURES:
        if any(marker in lowered for marker in markers):
            return Finding(code, "problem", subject, f"{meaning}: {message}", fix)
    return Finding("dry-run-failed", "problem", subject,
                   f"a dry-run pod in namespace {namespace} failed: {message}",
                   "see the injector's log for this admission")


def _api_message(error: ApiException) -> str:
    try:
        body = orjson.loads(error.body or b"{}")
    except orjson.JSONDecodeError:
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return " ".join(str(message or client.describe(error)).split())[:600]


def _probe_url(subject: str, url: str, roots: str) -> Finding:
    """A TLS handshake with the webhook's URL, trusting only its caBundle and checking its
    host name, as the API server does."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    context = ssl.create_default_context(cadata=roots)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        with contextlib.closing(socket.create_connection((host, port), PROBE_SECONDS)) as raw, \
                context.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as error:
        return Finding(
            "ca-bundle-stale", "problem", subject,
            f"its caBundle does not verify the certificate served at {url} "
            f"({error.verify_message}): the API server refuses to call it",
            "the injector writes its root into the caBundle at start and every minute: check "
            "its log (RBAC: patch on the MutatingWebhookConfiguration), or restart it")
    except (OSError, ssl.SSLError) as error:
        return Finding("webhook-unreachable", "problem", subject,
                       f"cannot connect to {url}: {error}",
                       "start the injector, or correct the webhook's URL")
    return Finding("ca-bundle", "ok", subject,
                   f"its caBundle verifies the certificate served at {url}")


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def load_pod_manifest(documents: Sequence[Any], source: str) -> dict[str, Any]:
    """The one pod a `check -f` file describes: a Pod, or the pod template of a workload
    (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job; a CronJob's job template's)."""
    found = [document for document in documents if isinstance(document, dict)]
    if len(found) != 1:
        raise CheckFailed(f"{source}: expected one Pod or workload, found {len(found)} documents")
    document = found[0]
    kind = document.get("kind")
    if kind == "Pod":
        return document
    spec = document.get("spec") or {}
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template") if isinstance(spec, dict) else None
    if not isinstance(template, dict):
        raise CheckFailed(f"{source}: a {kind or 'document without a kind'} has no pod to check")
    metadata = dict(template.get("metadata") or {})
    metadata.setdefault("name", (document.get("metadata") or {}).get("name") or "pod")
    metadata.setdefault("namespace", (document.get("metadata") or {}).get("namespace"))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": template.get("spec") or {}}
