"""Injection: whether a pod gets a sidecar, what it gets, and the AdmissionReview around it."""
