"""The connection to the Kubernetes API, shared by everything that talks to it.

One `ApiClient` from a kubeconfig file, or from the in-cluster service account when running in a
pod, or none at all (local use: the webhook then trusts its namespaceSelector and the CA its
static tokens). Built on an explicit `Configuration` so the kubernetes package's process-wide
default is never touched.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from urllib3.exceptions import HTTPError

from injector.errors import ConfigError


class KubeConfigError(ConfigError):
    """The kubeconfig (or in-cluster config) cannot be used; the message is one line."""


def api_client(kubeconfig: str | None) -> client.ApiClient | None:
    """An API client from `kubeconfig`, else in-cluster config when in a pod, else None."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            if not os.path.isfile(kubeconfig):
                raise KubeConfigError(f"kubeconfig {kubeconfig}: no such file")
            config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration,
                persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(
                client_configuration=configuration)
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


# Every call has a deadline (connect, read): a hung API server must not hang the caller.
REQUEST_TIMEOUT = (3.05, 10.0)

# What a failing API call raises through the client: its HTTP errors, and the transport's.
API_ERRORS = (ApiException, HTTPError, OSError, ValueError)


def describe(error: BaseException) -> str:
    """A failed call in one short line, for a log line or /readyz: an HTTP status and reason
    when the API answered, else the transport's complaint."""
    if isinstance(error, ApiException):
        return f"HTTP {error.status} {error.reason}"
    return " ".join(str(error).split())[:200] or type(error).__name__


class Rest:
    """The few REST calls the control plane makes, through the official client's `ApiClient`
    (its configuration, authentication, TLS and errors) but not its generated API classes:
    `CoreV1Api` alone costs 22 MiB of resident memory for the seven paths we use.
    """

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api

    def call(self, method: str, path: str, *, query: dict[str, str] | None = None,
             body: object = None, content_type: str = "application/json",
             timeout: float | tuple[float, float] = REQUEST_TIMEOUT) -> Any:
        """The urllib3 response, body not yet read; ApiException for a non-2xx answer."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, post_params = self._api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()),
            header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self._api.call_api(method, url, header_params=headers, body=body,
                                      post_params=post_params, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self.call(method, path, **kwargs)
        try:
            document: dict[str, Any] = orjson.loads(response.data)
            return document
        finally:
            response.release_conn()
