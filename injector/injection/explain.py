"""Why a pod is (or is not) injected, told step by step: the answer `injector check` gives.

Two deciders stand between a pod and its sidecar, and a user needs to see both:

1. the API server, which calls a mutating webhook only when the webhook's rules, its
   `namespaceSelector` (on the namespace's labels) and its `objectSelector` (on the pod's labels)
   all match: evaluated here as the API server evaluates them (`webhook_matches`), for every
   webhook of every configuration, so that a revision's or another mesh's webhooks are simply
   more webhooks;
2. the injector's own decision table (`injector.injection.policy.decide`), which this module
   calls rather than restates: the trace says what each rule looked at, and the rule that the
   decision's reason belongs to is the one that decided.

Everything here is pure: what the cluster holds is read by `injector.kube.check` and passed in.
A problem is a `Finding` that says what to do about it.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from injector.errors import InvalidInput
from injector.injection import overrides
from injector.injection.policy import Decision, decide
from injector.injection.review import AdmissionReview
from injector.injection.webhook import admit
from injector.mesh.config import MeshConfig
from injector.mesh.names import (
    INIT_CONTAINER,
    INJECT_LABEL,
    NAMESPACE_LABEL,
    PROXY_CONTAINER,
    STATUS_ANNOTATION,
)

# The label the API server puts on every namespace, naming it (selectors exclude by it).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# The values of the namespace label the injector honours; any other value is as if absent
# (injector.kube.sync does the same when it caches the labels).
NAMESPACE_LABEL_VALUES = ("enabled", "disabled")
# The path our webhooks (and Istio's) are served on.
INJECT_PATH = "/inject"
# At most this many pod label combinations are tried when looking for overlapping webhooks.
MAX_LABEL_VARIANTS = 256

Status = Literal["ok", "problem", "info"]


@dataclass(frozen=True)
class Finding:
    """One thing checked: `ok`, a `problem` (with what to do about it), or `info` (worth
    knowing, nothing to fix). `code` is stable, for scripts; the rest is for people."""

    code: str
    status: Status
    subject: str
    message: str
    fix: str = ""


# --- label selectors and webhook matching, as the API server does them --------------------------

def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """metav1.LabelSelector semantics: every matchLabels pair and every expression must hold;
    an absent or empty selector matches everything. An operator Kubernetes does not know
    matches nothing (the API server would have refused such a selector)."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or ():
        key = expression.get("key")
        operator = expression.get("operator")
        values = expression.get("values") or ()
        present = key in labels
        if operator == "In":
            holds = present and labels[key] in values
        elif operator == "NotIn":
            holds = not present or labels[key] not in values
        elif operator == "Exists":
            holds = present
        elif operator == "DoesNotExist":
            holds = not present
        else:
            holds = False
        if not holds:
            return False
    return True


def _rule_covers_pod_create(rule: Mapping[str, Any]) -> bool:
    def has(field_name: str, wanted: str) -> bool:
        values = rule.get(field_name) or ()
        return "*" in values or wanted in values

    resources = rule.get("resources") or ()
    scope = rule.get("scope", "*")
    return (has("operations", "CREATE") and has("apiGroups", "") and has("apiVersions", "v1")
            and ("pods" in resources or "*" in resources or "*/*" in resources)
            and scope in ("*", "Namespaced"))


def intercepts_pod_create(webhook: Mapping[str, Any]) -> bool:
    """Whether the webhook's rules cover creating a pod (core/v1 pods, CREATE)."""
    return any(_rule_covers_pod_create(rule) for rule in webhook.get("rules") or ())


@dataclass(frozen=True)
class Webhook:
    """One webhook of a MutatingWebhookConfiguration, with what a check needs of it."""

    configuration: str
    name: str
    spec: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.configuration}/{self.name}"

    @property
    def client_config(self) -> Mapping[str, Any]:
        return self.spec.get("clientConfig") or {}

    def selector_keys(self) -> set[str]:
        keys: set[str] = set()
        for which in ("namespaceSelector", "objectSelector"):
            selector = self.spec.get(which) or {}
            keys.update(selector.get("matchLabels") or {})
            keys.update(e.get("key") for e in selector.get("matchExpressions") or ())
        return keys

    def is_injector(self) -> bool:
        """A sidecar injector's webhook, ours or not: it intercepts pod creation and either its
        selectors use Istio's injection labels or it calls an `/inject` path. (A webhook that
        adds, say, a log shipper is none of these, and never counts as an overlap.)"""
        if not intercepts_pod_create(self.spec):
            return False
        path = (self.client_config.get("service") or {}).get("path") or ""
        url = self.client_config.get("url") or ""
        calls_inject = path.startswith(INJECT_PATH) or INJECT_PATH in url
        return calls_inject or bool(self.selector_keys() & {NAMESPACE_LABEL, INJECT_LABEL})

    def is_ours(self, our_configuration: str) -> bool:
        """Ours: in our configuration, or in one named after it (a revision's, `NAME-REV`)."""
        return (self.configuration == our_configuration
                or self.configuration.startswith(f"{our_configuration}-"))


def webhooks_of(configurations: Iterable[Mapping[str, Any]]) -> list[Webhook]:
    """Every webhook of these MutatingWebhookConfigurations, in the order the API server calls
    them (configurations by name, then webhooks in their listed order)."""
    found = []
    for configuration in sorted(configurations,
                                key=lambda c: (c.get("metadata") or {}).get("name") or ""):
        name = (configuration.get("metadata") or {}).get("name") or ""
        for webhook in configuration.get("webhooks") or ():
            found.append(Webhook(name, webhook.get("name") or "", webhook))
    return found


def namespace_selector_labels(namespace: str, labels: Mapping[str, str]) -> dict[str, str]:
    """A namespace's labels as a namespaceSelector sees them: the API server labels every
    namespace with its own name."""
    return {**labels, NAMESPACE_NAME_LABEL: namespace}


@dataclass(frozen=True)
class WebhookMatch:
    """Whether the API server would call one webhook for a pod, and what decided it."""

    webhook: str
    called: bool
    namespace_selector: bool
    object_selector: bool
    match_conditions: int  # CEL conditions, not evaluated here: the API server adds them
    ours: bool


def webhook_matches(webhook: Webhook, namespace: str, namespace_labels: Mapping[str, str],
                    pod_labels: Mapping[str, str], our_configuration: str) -> WebhookMatch:
    namespace_ok = selector_matches(webhook.spec.get("namespaceSelector"),
                                    namespace_selector_labels(namespace, namespace_labels))
    object_ok = selector_matches(webhook.spec.get("objectSelector"), pod_labels)
    return WebhookMatch(
        webhook=webhook.label,
        called=namespace_ok and object_ok and intercepts_pod_create(webhook.spec),
        namespace_selector=namespace_ok, object_selector=object_ok,
        match_conditions=len(webhook.spec.get("matchConditions") or ()),
        ours=webhook.is_ours(our_configuration))


# --- the decision, traced -----------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One rule of the decision table: what it looked at and whether it decided."""

    number: int
    rule: str
    looked_at: str
    outcome: Literal["passed", "decided", "not reached"]
    result: str = ""


@dataclass(frozen=True)
class Explanation:
    """The whole answer for one pod: the webhooks, the decision table, and the verdict."""

    pod: str
    namespace: str
    webhooks: list[WebhookMatch]
    steps: list[Step]
    decision: Decision
    injected: bool
    verdict: str
    findings: list[Finding] = field(default_factory=list)


# (number, rule, the decision reasons it can give): the README's table, in order. The reasons
# are policy.decide's; which rule decided is the one its reason belongs to.
RULES: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "spec.hostNetwork: true", ("host-network",)),
    (2, f"annotation {STATUS_ANNOTATION}", ("already-injected",)),
    (3, "the namespace is a system namespace or the injector's own", ("ignored-namespace",)),
    (4, f"namespace label {NAMESPACE_LABEL}=disabled", ("namespace-disabled",)),
    (5, f"pod label, else annotation, {INJECT_LABEL}",
     ("pod-label-false", "pod-label-true", "pod-annotation-false", "pod-annotation-true")),
    (6, f"namespace label {NAMESPACE_LABEL}=enabled", ("namespace-enabled",)),
    (7, "the mesh config's policy", ("policy-enabled", "policy-disabled")),
)


def honoured_namespace_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels as the injector honours them: a namespace label value other than enabled or
    disabled counts as absent."""
    kept = dict(labels)
    if kept.get(NAMESPACE_LABEL) not in (None, *NAMESPACE_LABEL_VALUES):
        del kept[NAMESPACE_LABEL]
    return kept


def _looked_at(number: int, pod: Mapping[str, Any], namespace: str,
               labels: Mapping[str, str], mesh: MeshConfig) -> str:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    pod_labels = metadata.get("labels") or {}
    namespace_value = labels.get(NAMESPACE_LABEL)
    shown = "absent" if namespace_value is None else repr(namespace_value)
    if number == 1:
        return f"spec.hostNetwork = {json.dumps(spec.get('hostNetwork', False))}"
    if number == 2:
        containers = [c.get("name") for part in ("initContainers", "containers")
                      for c in spec.get(part) or () if isinstance(c, dict)]
        status = "present" if STATUS_ANNOTATION in annotations else "absent"
        return f"status annotation {status}; containers {containers}"
    if number == 3:
        return (f"namespace {namespace!r}; ignored: "
                f"{sorted(mesh.all_ignored_namespaces)}")
    if number in (4, 6):
        return f"namespace label {NAMESPACE_LABEL} {shown}"
    if number == 5:
        label = pod_labels.get(INJECT_LABEL)
        annotation = annotations.get(INJECT_LABEL)
        return (f"label {'absent' if label is None else repr(label)}, "
                f"annotation {'absent' if annotation is None else repr(annotation)}")
    return f"policy {mesh.policy!r}"


def trace_decision(pod: Mapping[str, Any], namespace: str, labels: Mapping[str, str],
                   mesh: MeshConfig) -> tuple[Decision, list[Step]]:
    """policy.decide's answer for this pod, and each rule in order with what it looked at."""
    decision = decide(pod, namespace, labels, mesh)
    steps = []
    decided = False
    for number, rule, reasons in RULES:
        looked_at = _looked_at(number, pod, namespace, labels, mesh)
        if decided:
            steps.append(Step(number, rule, looked_at, "not reached"))
        elif decision.reason in reasons:
            result = f"{'inject' if decision.inject else 'skip'} ({decision.reason})"
            steps.append(Step(number, rule, looked_at, "decided", result))
            decided = True
        else:
            steps.append(Step(number, rule, looked_at, "passed"))
    return decision, steps


def as_created(pod: Mapping[str, Any]) -> dict[str, Any]:
    """A stored pod as its owner would create it again: without what injection added (the
    containers and volumes its status annotation lists, else the proxy's containers) and
    without the status annotation itself."""
    status = injection_status(pod) or {}
    metadata = dict(pod.get("metadata") or {})
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items()
                   if k != STATUS_ANNOTATION}
    metadata["annotations"] = annotations
    spec = dict(pod.get("spec") or {})
    added_containers = {PROXY_CONTAINER, INIT_CONTAINER}
    for part in ("containers", "initContainers"):
        listed = status.get(part)
        if isinstance(listed, list):
            added_containers.update(name for name in listed if isinstance(name, str))
    added_volumes = {name for name in status.get("volumes") or () if isinstance(name, str)}
    for part, added in (("containers", added_containers), ("initContainers", added_containers),
                        ("volumes", added_volumes)):
        if part in spec:
            spec[part] = [item for item in spec[part] or () if not isinstance(item, dict)
                          or item.get("name") not in added]
    return {**pod, "metadata": metadata, "spec": spec}


def pod_name(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") or {}
    return str(metadata.get("name") or f"{metadata.get('generateName') or 'pod-'}(generated)")


def webhook_refusal(pod: Mapping[str, Any], namespace: str,
                    namespace_labels: Mapping[str, str], mesh: MeshConfig) -> str | None:
    """Why the webhook would refuse this pod (its message), or None: the webhook's own answer
    to the review the API server would send, so every check it makes (Kubernetes' limits, the
    annotations, name clashes) is the one `check` reports. Not asked of a pod already injected:
    its creation went through (and what was added would clash with a second injection)."""
    if injection_status(pod) is not None:
        return None
    review: AdmissionReview = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "injector-check", "namespace": namespace, "operation": "CREATE",
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "object": dict(pod)}}
    outcome = admit(review, mesh, lambda _: dict(namespace_labels))
    if outcome.result != "denied":
        return None
    message: str = json.loads(outcome.body)["response"]["status"]["message"]
    return message


def explain(pod: Mapping[str, Any], namespace: str, namespace_labels: Mapping[str, str],
            mesh: MeshConfig, webhooks: Sequence[Webhook], our_configuration: str,
            ) -> Explanation:
    """Whether `pod`, created now in `namespace`, gets a sidecar, and why."""
    pod_labels = (pod.get("metadata") or {}).get("labels") or {}
    matches = [webhook_matches(webhook, namespace, namespace_labels, pod_labels,
                               our_configuration)
               for webhook in webhooks if webhook.is_injector()]
    called = [match for match in matches if match.called]
    decision, steps = trace_decision(pod, namespace, honoured_namespace_labels(namespace_labels),
                                     mesh)
    findings = namespace_findings(namespace, namespace_labels)
    subject = f"pod {namespace}/{pod_name(pod)}"
    ours_called = [match for match in called if match.ours]
    if not called:
        verdict = ("not injected: the API server calls no injection webhook for this pod "
                   "(no webhook's namespaceSelector and objectSelector both match)")
        injected = False
    elif not ours_called:
        verdict = (f"not injected by this injector: only {', '.join(m.webhook for m in called)}"
                   " would be called")
        injected = False
    elif not decision.inject:
        verdict = (f"not injected: {ours_called[0].webhook} is called and the injector decides "
                   f"to skip ({decision.reason})")
        injected = False
    else:
        injected = True
        verdict = (f"injected: {ours_called[0].webhook} is called and the injector decides to "
                   f"inject ({decision.reason})")
        refusal = webhook_refusal(pod, namespace, namespace_labels, mesh)
        if refusal is not None:
            injected = False
            verdict = f"refused: the injector would refuse to create this pod: {refusal}"
            findings.append(Finding(
                "pod-refused", "problem", subject, f"its creation would be refused: {refusal}",
                "fix what the message names (an annotation, a name, a limit)"))
    if len(called) > 1:
        findings.append(Finding(
            "webhooks-overlap", "problem", subject,
            f"{len(called)} injection webhooks would be called for it: "
            f"{', '.join(match.webhook for match in called)}",
            "make their selectors exclusive: give the namespace one of istio-injection or "
            "istio.io/rev, not both, or remove the other mesh's webhook"))
    return Explanation(subject.removeprefix("pod "), namespace, matches, steps, decision,
                       injected, verdict, findings)


def namespace_findings(namespace: str, labels: Mapping[str, str]) -> list[Finding]:
    """A namespace label the injector would not honour as its author meant: a value other than
    enabled/disabled, or a key one typo away from istio-injection."""
    found = []
    value = labels.get(NAMESPACE_LABEL)
    if value is not None and value not in NAMESPACE_LABEL_VALUES:
        found.append(Finding(
            "namespace-label-invalid", "problem", f"namespace {namespace}",
            f"label {NAMESPACE_LABEL}={value!r} is neither enabled nor disabled, and counts as "
            "absent",
            f"kubectl label namespace {namespace} {NAMESPACE_LABEL}=enabled --overwrite"))
    for key in labels:
        if key != NAMESPACE_LABEL and difflib.SequenceMatcher(
                None, key, NAMESPACE_LABEL).ratio() >= 0.85:
            found.append(Finding(
                "namespace-label-misspelt", "problem", f"namespace {namespace}",
                f"label {key}={labels[key]!r} looks like a misspelt {NAMESPACE_LABEL}, which "
                "the injector and its webhooks ignore",
                f"kubectl label namespace {namespace} {key}- "
                f"{NAMESPACE_LABEL}={labels[key]} --overwrite"))
    return found


# --- webhooks that would inject the same pods ---------------------------------------------------

def pod_label_variants(webhooks: Sequence[Webhook]) -> list[dict[str, str]]:
    """Pod label sets that tell apart every objectSelector of these webhooks: for each key
    they use, absent, each value they name, and one they do not."""
    choices: dict[str, list[str | None]] = {}
    for webhook in webhooks:
        selector = webhook.spec.get("objectSelector") or {}
        for key, value in (selector.get("matchLabels") or {}).items():
            choices.setdefault(key, [None, "-other-"]).append(value)
        for expression in selector.get("matchExpressions") or ():
            values = choices.setdefault(expression.get("key"), [None, "-other-"])
            values.extend(expression.get("values") or ())
    keys = sorted(choices)
    variants = []
    for combination in itertools.product(*(dict.fromkeys(choices[key]) for key in keys)):
        variants.append({key: value for key, value in zip(keys, combination, strict=True)
                         if value is not None})
        if len(variants) >= MAX_LABEL_VARIANTS:
            break
    return variants


def overlapping_webhooks(webhooks: Sequence[Webhook],
                         namespaces: Mapping[str, Mapping[str, str]]) -> list[Finding]:
    """Namespaces where some pod would be sent to two or more injection webhooks (two
    revisions, a tag and a revision, another mesh): each would add its own sidecar."""
    injectors = [webhook for webhook in webhooks if webhook.is_injector()]
    variants = pod_label_variants(injectors)
    found = []
    for namespace in sorted(namespaces):
        labels = namespace_selector_labels(namespace, namespaces[namespace])
        in_namespace = [w for w in injectors
                        if selector_matches(w.spec.get("namespaceSelector"), labels)]
        if len(in_namespace) < 2:
            continue
        for pod_labels in variants:
            called = [w for w in in_namespace
                      if selector_matches(w.spec.get("objectSelector"), pod_labels)]
            if len(called) > 1:
                shown = ", ".join(f"{k}={v}" for k, v in sorted(pod_labels.items())) or "none"
                found.append(Finding(
                    "webhooks-overlap", "problem", f"namespace {namespace}",
                    f"a pod with labels [{shown}] would be sent to "
                    f"{' and '.join(w.label for w in called)}",
                    "make the webhooks' selectors exclusive: label the namespace for one "
                    "revision only (istio-injection or istio.io/rev, not both), or remove the "
                    "other injector's MutatingWebhookConfiguration"))
                break
    return found


# --- pods that need a restart -------------------------------------------------------------------

def injection_status(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod's injection record (the status annotation), {} if it has a proxy container but
    no readable record, None if it was not injected."""
    metadata = pod.get("metadata") or {}
    raw = (metadata.get("annotations") or {}).get(STATUS_ANNOTATION)
    if raw is not None:
        try:
            status = json.loads(raw)
        except (TypeError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}
    spec = pod.get("spec") or {}
    for part in ("containers", "initContainers"):
        for container in spec.get(part) or ():
            if isinstance(container, dict) and container.get("name") == PROXY_CONTAINER:
                return {}
    return None


def restart_hint(pod: Mapping[str, Any], namespace: str) -> str:
    """How to have the pod created again: through its owner when it has one."""
    metadata = pod.get("metadata") or {}
    owners = [o for o in metadata.get("ownerReferences") or () if o.get("controller")]
    if owners:
        owner = owners[0]
        kind, name = str(owner.get("kind") or ""), str(owner.get("name") or "")
        template_hash = (metadata.get("labels") or {}).get("pod-template-hash")
        if kind == "ReplicaSet" and template_hash and name.endswith(f"-{template_hash}"):
            return (f"kubectl -n {namespace} rollout restart "
                    f"deployment/{name.removesuffix(f'-{template_hash}')}")
        if kind in ("StatefulSet", "DaemonSet"):
            return f"kubectl -n {namespace} rollout restart {kind.lower()}/{name}"
        return f"delete the pod for its {kind} {name} to create it again"
    return f"delete and create again pod {namespace}/{pod_name(pod)} (it has no owner)"


def pod_findings(pod: Mapping[str, Any], namespace: str, namespace_labels: Mapping[str, str],
                 mesh: MeshConfig, webhooks: Sequence[Webhook], our_configuration: str,
                 ) -> tuple[Explanation, list[Finding]]:
    """A stored pod against what it would get if created now: a sidecar it lacks, one it
    should not have, one from another revision, or one built from an older template."""
    now = explain(as_created(pod), namespace, namespace_labels, mesh, webhooks,
                  our_configuration)
    now = dataclasses.replace(now, verdict=f"if created now, {now.verdict}")
    subject = f"pod {namespace}/{pod_name(pod)}"
    status = injection_status(pod)
    hint = restart_hint(pod, namespace)
    found: list[Finding] = []
    # A pod another mesh's webhook injects is that injector's business, not a problem of ours.
    foreign = any(match.called and not match.ours for match in now.webhooks)
    ours = any(match.called and match.ours for match in now.webhooks)
    if status is None and now.injected:
        found.append(Finding(
            "pod-not-injected", "problem", subject,
            "has no sidecar, but would be injected if created now (it was created before the "
            "namespace or pod was labelled, or while the webhook was not called)", hint))
    elif (status is not None and not now.injected and not foreign
          and now.decision.reason != "host-network"):
        found.append(Finding(
            "pod-injected-unwanted", "problem", subject,
            f"has a sidecar, but would not be injected if created now ({now.verdict})", hint))
    elif status is not None and ours:
        revision = status.get("revision")
        if revision is not None and revision != mesh.revision:
            found.append(Finding(
                "pod-other-revision", "problem", subject,
                f"was injected by revision {revision!r}, the injector now is {mesh.revision!r}",
                hint))
        expected = _expected_image(pod, mesh)
        actual = _proxy_image(pod)
        if expected is not None and actual is not None and actual != expected:
            found.append(Finding(
                "pod-old-template", "problem", subject,
                f"its sidecar runs {actual}, injection now gives {expected} (an older "
                "template)", hint))
    if not found:
        state = "injected" if status is not None else "not injected"
        found.append(Finding("pod-current", "ok", subject,
                             f"{state}, as it would be if created now"))
    return now, found


def _proxy_image(pod: Mapping[str, Any]) -> str | None:
    spec = pod.get("spec") or {}
    for part in ("containers", "initContainers"):
        for container in spec.get(part) or ():
            if isinstance(container, dict) and container.get("name") == PROXY_CONTAINER:
                image = container.get("image")
                return image if isinstance(image, str) else None
    return None


def _expected_image(pod: Mapping[str, Any], mesh: MeshConfig) -> str | None:
    try:
        return overrides.read((pod.get("metadata") or {}).get("annotations") or {}, mesh).image
    except InvalidInput:
        return None


# --- the report -----------------------------------------------------------------------------------

@dataclass
class Report:
    """What `injector check` prints: the findings, and for a pod the explanation."""

    command: str
    findings: list[Finding] = field(default_factory=list)
    explanations: list[Explanation] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        return [finding for finding in self.findings if finding.status == "problem"]

    def as_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "ok": not self.problems,
            "problems": len(self.problems),
            "findings": [asdict(finding) for finding in self.findings],
            "explanations": [asdict(explanation) for explanation in self.explanations],
        }


_MARKS = {"ok": "ok     ", "problem": "PROBLEM", "info": "info   "}


def render_text(report: Report) -> str:
    """The report for a person: each explanation's trace, then every finding, problems with
    what to do."""
    lines: list[str] = []
    for explanation in report.explanations:
        lines.append(f"pod {explanation.pod}: {explanation.verdict}")
        lines.append("  webhooks the API server would call (namespaceSelector, objectSelector):")
        if not explanation.webhooks:
            lines.append("    (no injection webhook is registered)")
        for match in explanation.webhooks:
            called = "called    " if match.called else "not called"
            extra = (f"; {match.match_conditions} matchConditions not evaluated"
                     if match.match_conditions else "")
            lines.append(f"    {called} {match.webhook} (namespace "
                         f"{'matches' if match.namespace_selector else 'does not match'}, pod "
                         f"{'matches' if match.object_selector else 'does not match'}{extra})")
        lines.append("  the injector's decision, first match wins:")
        for step in explanation.steps:
            result = f" -> {step.result}" if step.result else ""
            lines.append(f"    {step.number}. {step.outcome:<11} {step.rule} | "
                         f"{step.looked_at}{result}")
        lines.append("")
    for finding in report.findings:
        lines.append(f"{_MARKS[finding.status]} {finding.subject}: {finding.message}")
        if finding.fix and finding.status == "problem":
            lines.append(f"        fix: {finding.fix}")
    problems = len(report.problems)
    lines.append(f"{problems} problem{'s' if problems != 1 else ''} found" if problems
                 else "no problems found")
    return "\n".join(lines) + "\n"
