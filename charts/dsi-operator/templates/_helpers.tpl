{{/*
Chart name, shortened to the 63 characters a label value allows.
*/}}
{{- define "dsi-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name alone when it already contains the chart name.
*/}}
{{- define "dsi-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dsi-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: stable across upgrades (a Deployment's selector is immutable).
*/}}
{{- define "dsi-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsi-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object of the chart.
*/}}
{{- define "dsi-operator.labels" -}}
helm.sh/chart: {{ include "dsi-operator.chart" . }}
{{ include "dsi-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: deepspeed-inference-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dsi-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dsi-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dsi-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator reads and writes. docs/rbac.md holds
the same table with the reason for every verb; tests/tools/test_chart.py checks the two are
equal, and tests/integration/test_rbac.py checks every verb is used by the operator.
*/}}
{{- define "dsi-operator.namespacedRules" -}}
- apiGroups: ["deepspeed.ai"]
  resources: ["deepspeedinferences"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["deepspeed.ai"]
  resources: ["deepspeedinferences/status"]
  verbs: ["patch"]
- apiGroups: ["ray.io"]
  resources: ["rayservices"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["ray.io"]
  resources: ["rayclusters"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["deepspeed.ai"]
  resources: ["deepspeedbatchinferences"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["deepspeed.ai"]
  resources: ["deepspeedbatchinferences/status"]
  verbs: ["patch"]
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
RBAC rules for cluster-scoped objects, all read-only. kopf scans CRDs (list/watch) only when
it watches all namespaces; with exact namespaces the operator turns scanning off.
*/}}
{{- define "dsi-operator.clusterRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: {{ if empty .Values.watchNamespaces }}["get", "list", "watch"]{{ else }}["get"]{{ end }}
- apiGroups: ["nvidia.com"]
  resources: ["clusterpolicies"]
  verbs: ["list"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["list"]
{{- end }}
