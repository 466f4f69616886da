{{/* The chart name, or nameOverride. */}}
{{- define "gcp-token-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the chart's objects: fullnameOverride, else the release name when it contains the
chart name, else RELEASE-CHART. Object names are DNS labels, hence the 63 characters.
*/}}
{{- define "gcp-token-operator.fullname" -}}
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

{{/* What selects the operator's pods; never changes over upgrades (Deployment selectors are immutable). */}}
{{- define "gcp-token-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gcp-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "gcp-token-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "gcp-token-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
metadata.labels and metadata.annotations of an object: the common ones plus, for some objects,
their own. Call with (dict "ctx" $ "labels" EXTRA_LABELS "annotations" EXTRA_ANNOTATIONS).
*/}}
{{- define "gcp-token-operator.metadata" -}}
labels:
  {{- include "gcp-token-operator.labels" .ctx | nindent 2 }}
  {{- with .labels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with merge (deepCopy (.annotations | default dict)) .ctx.Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "gcp-token-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gcp-token-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gcp-token-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's permissions; the same rules serve the ClusterRole and each namespaced Role. Every rule
is a call the operator makes (tests/chart.rs holds the reviewed list).
*/}}
{{- define "gcp-token-operator.rules" -}}
# Watches TokenRequests (and lists them once at start-up to check the CRD).
- apiGroups: [gcptoken.dev]
  resources: [tokenrequests]
  verbs: [list, watch]
# Writes the status with server-side apply.
- apiGroups: [gcptoken.dev]
  resources: [tokenrequests/status]
  verbs: [patch]
# The Secrets it writes carry a controller ownerReference with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin (e.g. on OpenShift) only allows with this.
- apiGroups: [gcptoken.dev]
  resources: [tokenrequests/finalizers]
  verbs: [update]
# Its own Secrets: watched by label, applied (a server-side apply that creates needs create too),
# deleted after a rename; get reads a `secret` source and checks a name before taking it.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
# Mints the ServiceAccount tokens of `serviceAccountToken` sources.
- apiGroups: [""]
  resources: [serviceaccounts/token]
  verbs: [create]
# Events (kube's Recorder patches a repeated event into a series).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.rolloutRestarts.enabled }}
# `spec.rolloutRestartTargets`: a merge patch of one pod-template annotation restarts a workload.
- apiGroups: [apps]
  resources: [deployments, statefulsets, daemonsets]
  verbs: [patch]
{{- end }}
{{- if .Values.serviceAccountAttachment.enabled }}
# `spec.secret.attachToServiceAccounts`: JSON patches add and remove the operator's one
# `imagePullSecrets` entry, computed from the ServiceAccount as read...
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, patch]
# ...and a finalizer, applied to the TokenRequests that attach, removes them before it goes.
- apiGroups: [gcptoken.dev]
  resources: [tokenrequests]
  verbs: [patch]
{{- end }}
{{- end }}
