{{/*
The labels every object gets: those deploy/'s kustomization adds (app.kubernetes.io/name and
part-of), and Helm's own (which the test comparing this chart with deploy/ sets aside).
*/}}
{{- define "injector.labels" -}}
app.kubernetes.io/name: injector
app.kubernetes.io/part-of: injector
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
The name of the cluster-scoped objects (ClusterRole, ClusterRoleBinding and the webhook
configuration): `injector`, or `injector-<revision>` for a revision, so that a revision installs
beside the default installation instead of taking over its objects.
*/}}
{{- define "injector.clusterName" -}}
{{ if .Values.revision }}injector-{{ .Values.revision }}{{ else }}injector{{ end }}
{{- end -}}

{{- define "injector.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The namespaces no webhook may ever send: the system ones and the injector's own. */}}
{{- define "injector.excludedNamespaces" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: ["kube-system", "kube-public", "kube-node-lease", {{ .Release.Namespace | quote }}]
{{- end -}}

{{/* One webhook: the shared parts, then the name and selectors given in the dict. */}}
{{- define "injector.webhook" -}}
- name: {{ .name }}
  admissionReviewVersions: ["v1", "v1beta1"]
  sideEffects: None
  failurePolicy: {{ .root.Values.webhook.failurePolicy }}
  timeoutSeconds: {{ .root.Values.webhook.timeoutSeconds }}
  reinvocationPolicy: IfNeeded
  matchPolicy: Equivalent
  {{- /* No call for a pod injected already (sidecar.istio.io/status; not with hostNetwork,
  which the server decides first): the API server would call again after its in-tree plugins
  change the injected pod, only to hear "already-injected". As deploy/webhook.yaml, which says
  why at length. */}}
  matchConditions:
    - name: not-injected-yet
      expression: >-
        !has(object.metadata.annotations)
        || !('sidecar.istio.io/status' in object.metadata.annotations)
        || (has(object.spec.hostNetwork) && object.spec.hostNetwork)
  clientConfig:
    {{- if .root.Values.ca.cacerts.rootCert }}
    caBundle: {{ .root.Values.ca.cacerts.rootCert | b64enc }}
    {{- end }}
    {{- if .root.Values.webhook.url }}
    url: {{ .root.Values.webhook.url }}
    {{- else }}
    service:
      name: injector
      namespace: {{ .root.Release.Namespace }}
      path: /inject
      port: 443
    {{- end }}
  rules:
    - operations: ["CREATE"]
      apiGroups: [""]
      apiVersions: ["v1"]
      resources: ["pods"]
      scope: Namespaced
  namespaceSelector:
    matchExpressions:
      {{- .namespaceExpressions | nindent 6 }}
      {{- include "injector.excludedNamespaces" .root | nindent 6 }}
  objectSelector:
    matchExpressions:
      {{- .objectExpressions | nindent 6 }}
{{- end -}}
