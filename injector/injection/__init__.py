"""Injection: whether a pod gets a sidecar (`policy`), what it gets (`overrides`, `containers`,
`sidecar`), the patch that adds it (`patch`), and around them the AdmissionReview (`review`,
`webhook`) or the manifests kube-inject walks (`manifests`)."""
