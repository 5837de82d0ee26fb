"""Answers remembered by the review they answer, but for its uid.

The pods of one ReplicaSet reach the webhook as AdmissionReviews that are the same bytes but
for `request.uid`: the API server names them after admission (`generateName`), and their
specs are the controller's template. Their answers are the same bytes but for that uid too,
since the answer is a function of the review, the namespace's labels and the mesh config, and
echoes the uid and nothing else of it. So a review seen before is answered without parsing it,
checking it or injecting anything: the answer it got, with the new uid in place of the old.

What makes a body one of those, checked cheaply and without parsing it:
- at most MAX_BODY_BYTES, and no backslash in it: every string in it is written as is, so
  the bytes of `"uid":"` and of the uid can be found by searching;
- its first `"uid":"` is followed by a uid of ASCII letters, digits and dashes (a Kubernetes
  UID is a UUID), then a quote.
The body is keyed by what precedes the uid and what follows it. An answer is remembered only
when, in the body it was made for, that first uid was `request.uid` and appeared nowhere else,
and the answer holds the uid once: then a body with the same key is the same review but for
`request.uid`, and its answer is the remembered one with its own uid.

An answer is remembered from the second time its key is seen: a review seen once (a new pod
spec, or every pod when each is different) costs no memory and little time (the key, and a
number remembered). The namespace labels the decision read are remembered with it and read
again for each answer from memory: a namespace relabelled since gets a fresh answer. Bounded as
the patch cache is
(SECURITY.md): an entry's body and answer at most MAX_ENTRY_BYTES, all of them at most
MAX_BYTES and MAX_ENTRIES, and everything is dropped when a bound would be passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from injector.injection import webhook

# The bodies of an admission's two parts, before and after its uid.
Key = tuple[bytes, bytes]
_UID_FIELD = b'"uid":"'


class Answered(NamedTuple):
    """A remembered answer, split around its uid, and what else it depends on."""

    head: bytes
    tail: bytes
    outcome: webhook.Outcome
    # (namespace, its labels) for each namespace the decision read the labels of.
    labels: tuple[tuple[str, Mapping[str, str] | None], ...]


class LabelsRead:
    """A NamespaceLabels that records what it answered."""

    def __init__(self, namespace_labels: webhook.NamespaceLabels) -> None:
        self.namespace_labels = namespace_labels
        self.read: list[tuple[str, Mapping[str, str] | None]] = []

    def __call__(self, namespace: str) -> Mapping[str, str] | None:
        labels = self.namespace_labels(namespace)
        # A copy: the labels a decision read, even if the mapping is changed in place later.
        self.read.append((namespace, None if labels is None else dict(labels)))
        return labels


class Answers:
    MAX_BODY_BYTES = 16 * 1024
    MAX_ENTRY_BYTES = 48 * 1024
    MAX_ENTRIES = 1024
    MAX_BYTES = 4 * 1024 * 1024
    # The keys seen once, by hash, and how many of them at most.
    MAX_SEEN = 4096

    def __init__(self) -> None:
        # Read directly on the hot path (`entries.get`).
        self.entries: dict[Key, Answered] = {}
        self.bytes = 0
        self._seen: set[int] = set()

    @classmethod
    def split(cls, body: bytes) -> tuple[Key, bytes] | None:
        """The key of `body` and its uid, or None when it is not a body answers are kept for."""
        if len(body) > cls.MAX_BODY_BYTES or b"\\" in body:
            return None
        start = body.find(_UID_FIELD)
        if start < 0:
            return None
        start += len(_UID_FIELD)
        end = body.find(b'"', start)
        uid = body[start:end]
        if end < 0 or not uid.replace(b"-", b"").isalnum():  # ASCII only, for bytes
            return None
        return (body[:start], body[end:]), uid

    def get(self, key: Key, namespace_labels: webhook.NamespaceLabels) -> Answered | None:
        """The answer remembered for `key`, if the labels it read are still the same."""
        answered = self.entries.get(key)
        if answered is None:
            return None
        for namespace, labels in answered.labels:
            if namespace_labels(namespace) != labels:
                return None
        return answered

    def seen_before(self, key: Key) -> bool:
        """Whether `key` was seen before (its answer is worth keeping); remembers that it was.
        By hash: a collision costs an entry kept, nothing else."""
        digest = hash(key)
        if digest in self._seen:
            return True
        if len(self._seen) >= self.MAX_SEEN:
            self._seen.clear()
        self._seen.add(digest)
        return False

    def put(self, key: Key, uid: bytes, body: bytes, review: Any, outcome: webhook.Outcome,
            labels: LabelsRead) -> None:
        """Remember `outcome` (the answer to `body`, whose key and uid `split` gave), when
        `request.uid` is that uid and appears once in the body, and once in the answer."""
        if (review["request"]["uid"] != uid.decode() or body.count(uid) != 1
                or outcome.body.count(uid) != 1):
            return
        size = len(key[0]) + len(key[1]) + len(outcome.body)
        if size > self.MAX_ENTRY_BYTES:
            return
        if len(self.entries) >= self.MAX_ENTRIES or self.bytes + size > self.MAX_BYTES:
            self.entries.clear()
            self.bytes = 0
        head, tail = outcome.body.split(uid)
        # The outcome without its body: the answer is head, uid, tail.
        self.entries[key] = Answered(head, tail, webhook.Outcome(b"", *outcome[1:]),
                                     tuple(labels.read))
        self.bytes += size

    def __len__(self) -> int:
        return len(self.entries)

