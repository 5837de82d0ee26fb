"""Istio-compatible sidecar injector and SPIFFE certificate authority for Kubernetes."""

__version__ = "0.1.0"
