{{/* Names, labels and shared snippets. */}}

{{- define "framelane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name: the release name when it already contains the chart name. */}}
{{- define "framelane.fullname" -}}
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

{{- define "framelane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "framelane.labels" -}}
helm.sh/chart: {{ include "framelane.chart" . }}
app.kubernetes.io/part-of: framelane
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "framelane.operatorSelectorLabels" -}}
app.kubernetes.io/name: framelane-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Runner pods are made by the operator; it labels them so. */}}
{{- define "framelane.runnerSelectorLabels" -}}
app.kubernetes.io/name: framelane-runner
app.kubernetes.io/component: runner
{{- end }}

{{- define "framelane.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "framelane.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "framelane.runnerServiceAccountName" -}}
{{- if .Values.runner.serviceAccount.create }}
{{- default (printf "%s-runner" (include "framelane.fullname" .)) .Values.runner.serviceAccount.name }}
{{- else }}
{{- required "runner.serviceAccount.name is required when runner.serviceAccount.create is false" .Values.runner.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "framelane.webhookServiceName" -}}
{{- printf "%s-webhook" (include "framelane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "framelane.webhookSecretName" -}}
{{- default (printf "%s-webhook-tls" (include "framelane.fullname" .)) .Values.webhook.certificates.secretName }}
{{- end }}

{{- define "framelane.leaderLeaseName" -}}
{{- printf "%s-operator" (include "framelane.fullname" .) }}
{{- end }}

{{- define "framelane.modelsClaim" -}}
{{- default (printf "%s-models" (include "framelane.fullname" .)) .Values.volumes.models.existingClaim }}
{{- end }}

{{- define "framelane.outputsClaim" -}}
{{- default (printf "%s-outputs" (include "framelane.fullname" .)) .Values.volumes.outputs.existingClaim }}
{{- end }}

{{- define "framelane.image" -}}
{{- $tag := default .context.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
What the validating and the mutating webhook have in common: how the API server calls the
operator at `path`, for which creates, in which namespaces.
*/}}
{{- define "framelane.webhookEntry" -}}
{{- $root := .root -}}
admissionReviewVersions: ["v1"]
sideEffects: None
failurePolicy: {{ $root.Values.webhook.failurePolicy }}
timeoutSeconds: {{ $root.Values.webhook.timeoutSeconds }}
matchPolicy: Equivalent
clientConfig:
  {{- if $root.Values.webhook.url }}
  url: {{ printf "%s%s" (trimSuffix "/" $root.Values.webhook.url) .path | quote }}
  {{- else }}
  service:
    name: {{ include "framelane.webhookServiceName" $root }}
    namespace: {{ $root.Release.Namespace }}
    path: {{ .path }}
    port: 443
  {{- end }}
rules:
  - apiGroups: [framelane.dev]
    apiVersions: [v1alpha1]
    operations: [CREATE]
    resources: [videojobs]
    scope: Namespaced
namespaceSelector:
  {{- if $root.Values.webhook.namespaceSelector }}
  {{- toYaml $root.Values.webhook.namespaceSelector | nindent 2 }}
  {{- else if $root.Values.operator.watchNamespace }}
  matchLabels:
    kubernetes.io/metadata.name: {{ $root.Values.operator.watchNamespace }}
  {{- else }}
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values: [kube-system, kube-public, kube-node-lease]
  {{- end }}
{{- end }}
