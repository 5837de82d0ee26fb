"""The Kubernetes API: the only package that uses the `kubernetes` client.

- `client`: the connection (a kubeconfig, or the pod's service account) and the few REST calls;
- `ca_secret`: the CA the replicas share through the Secret `istio-ca-secret`, adopted at start;
- `sync`: the duties kept in the background: the namespace-label cache, the root ConfigMaps, the
  webhook's caBundle.

Importing the client costs about 15 MiB of RSS, so these modules are imported only when there is
an API to talk to; this file imports none of them.
"""
