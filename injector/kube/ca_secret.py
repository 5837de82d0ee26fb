"""The CA that every replica shares, through the Secret `istio-ca-secret`.

Replicas behind one Service must sign for one root, or a sidecar would distrust the peers whose
certificates another replica signed. The first replica to start makes a CA and stores it in the
Secret; every later one (and that one, restarted) adopts what is stored there. A CA plugged in
through `cacerts` wins: the Secret is then never read nor written.

Runs once, at start and before the certificates directory is completed; the API down at that
moment costs this replica the shared root (it serves with its own and says so in /readyz), not
its start.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from pathlib import Path

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from injector.ca import certsdir
from injector.kube import client
from injector.mesh.names import SHARED_CA_SECRET

# The name the log lines carried when this lived with the cluster sync; operators filter on it.
log = logging.getLogger("injector.cluster")


def _shared_ca_files(rest: client.Rest, namespace: str, trust_domain: str) -> dict[str, bytes]:
    """The CA every replica signs with: from the Secret, or made now and stored there."""
    secrets = f"/api/v1/namespaces/{namespace}/secrets"
    try:
        secret = rest.json("GET", f"{secrets}/{SHARED_CA_SECRET}")
    except ApiException as error:
        if error.status != 404:
            raise
        files = certsdir.generate_ca_files(trust_domain)
        body = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": SHARED_CA_SECRET, "namespace": namespace},
            "data": {name: base64.b64encode(data).decode() for name, data in files.items()},
        }
        try:
            rest.json("POST", secrets, body=body)
            log.info("created the shared CA Secret %s/%s", namespace, SHARED_CA_SECRET)
            return files
        except ApiException as create_error:
            if create_error.status != 409:
                raise
            # Another replica stored its CA first: sign with that one, as every replica must.
            secret = rest.json("GET", f"{secrets}/{SHARED_CA_SECRET}")
    data = secret.get("data") or {}
    try:
        return {name: base64.b64decode(data[name], validate=True) for name in certsdir.CA_FILES}
    except (KeyError, binascii.Error):
        raise certsdir.CertsError(
            f"Secret {namespace}/{SHARED_CA_SECRET} lacks a valid "
            f"{', '.join(certsdir.CA_FILES)}") from None


def adopt_shared_ca(api: ApiClient, *, namespace: str, certs_dir: Path,
                    trust_domain: str, attempts: int = 3) -> str | None:
    """Before the certificates directory is completed: unless it already holds a CA (a
    plugged-in `cacerts`, or this replica's earlier start), fill it with the CA shared by all
    replicas through a Secret, so that every replica signs for the same root.

    Returns None, or why this replica could not get the shared CA (the API down at start: it
    then serves with a root of its own rather than not at all).
    """
    if any((certs_dir / name).exists() for name in certsdir.CA_FILES):
        return None
    rest = client.Rest(api)
    for attempt in range(attempts):
        try:
            certsdir.adopt_ca_files(certs_dir,
                                    _shared_ca_files(rest, namespace, trust_domain))
            return None
        except client.API_ERRORS as error:
            problem = f"shared CA Secret {namespace}/{SHARED_CA_SECRET}: {client.describe(error)}"
            log.warning("%s (attempt %d of %d)", problem, attempt + 1, attempts)
            time.sleep(min(2.0**attempt, 5.0))
    return f"{problem}; this replica signs with a root of its own until restarted"
