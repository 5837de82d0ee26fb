"""TokenReview against the Kubernetes API: the one call the CA's TokenReview authenticator needs.

The authenticator (injector.ca.authn) holds the rules and the cache; this is only the request,
with a deadline, and the translation of every way it can fail into "cannot decide now"
(`AuthenticationUnavailable`, a 503 the sidecar retries), never into "unknown token".
"""

from __future__ import annotations

from typing import Any

from injector.ca.authn import AuthenticationUnavailable, ReviewedToken


class KubeTokenReviewer:
    """`TokenReviewer` over the official client (imported only when a cluster is configured)."""

    def __init__(self, api_client: Any, *, request_timeout_seconds: float = 3.0) -> None:
        from kubernetes.client import AuthenticationV1Api

        self._api = AuthenticationV1Api(api_client)
        self._timeout = request_timeout_seconds

    def review(self, token: str, audience: str) -> ReviewedToken:
        from kubernetes.client import V1TokenReview, V1TokenReviewSpec
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=[audience]))
        try:
            review = self._api.create_token_review(body, _request_timeout=self._timeout)
        except ApiException as error:
            raise AuthenticationUnavailable(
                f"TokenReview failed with HTTP {error.status}") from None
        except (HTTPError, OSError, ValueError) as error:
            raise AuthenticationUnavailable(
                f"Kubernetes API unreachable ({type(error).__name__})") from None
        status = review.status
        if status is None:
            return ReviewedToken(False, (), "")
        user = status.user
        return ReviewedToken(bool(status.authenticated), tuple(status.audiences or ()),
                             (user.username if user is not None else None) or "",
                             status.error or "")
