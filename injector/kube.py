"""The connection to the Kubernetes API, shared by everything that talks to it.

One `ApiClient` from a kubeconfig file, or from the in-cluster service account when running in a
pod, or none at all (local use: the webhook then trusts its namespaceSelector and the CA its
static tokens). Built on an explicit `Configuration` so the kubernetes package's process-wide
default is never touched.
"""

from __future__ import annotations

import os

import yaml
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException


class KubeConfigError(Exception):
    """The kubeconfig (or in-cluster config) cannot be used; the message is one line."""


def api_client(kubeconfig: str | None) -> client.ApiClient | None:
    """An API client from `kubeconfig`, else in-cluster config when in a pod, else None."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            if not os.path.isfile(kubeconfig):
                raise KubeConfigError(f"kubeconfig {kubeconfig}: no such file")
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration,
                                    persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            return None
    except KubeConfigError:
        raise
    except (ConfigException, yaml.YAMLError, OSError, ValueError, TypeError, KeyError) as error:
        source = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster config"
        reason = " ".join(str(error).split()) or type(error).__name__
        raise KubeConfigError(f"{source}: {reason[:300]}") from None
    # Fail fast when the API is down (the CA answers 503 and the caller retries) rather than
    # sit in urllib3's default retries.
    configuration.retries = 1
    return client.ApiClient(configuration)
