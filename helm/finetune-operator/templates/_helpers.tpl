{{/*
Expand the name of the chart.
*/}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name, truncated at 63 characters (the DNS label limit).
If the release name contains the chart name it is used as the full name.
*/}}
{{- define "finetune-operator.fullname" -}}
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

{{/*
Chart name and version as used by the chart label.
*/}}
{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/*
Selector labels of the operator pods (immutable once a Deployment exists: keep them stable).
*/}}
{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Name of the operator's ServiceAccount.
*/}}
{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: repository:tag, or repository:tag@digest when a
digest pins it. The tag defaults to the chart's appVersion.
Usage: include "finetune-operator.image" (dict "image" .Values.image "root" .)
*/}}
{{- define "finetune-operator.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end }}

{{/*
The operator's RBAC rules, generated from operator/finetune_operator/rbac.py into files/rbac.yaml
by helm/sync_chart_files.py (a test fails when they drift). Usage:
  include "finetune-operator.rules" (dict "root" . "key" "clusterRules")
*/}}
{{- define "finetune-operator.rules" -}}
{{- $rbac := .root.Files.Get "files/rbac.yaml" | fromYaml -}}
{{- $rules := index $rbac .key -}}
{{- if not $rules -}}
{{- fail (printf "files/rbac.yaml has no %s: run python helm/sync_chart_files.py" .key) -}}
{{- end -}}
{{- toYaml $rules -}}
{{- end }}

{{/*
The tenancy policy as the operator and the ValidatingAdmissionPolicy apply it: the `tenancy`
values with allowedImages defaulting to the trainer image's repository. Usage:
  include "finetune-operator.tenancy" . | fromJson
*/}}
{{- define "finetune-operator.tenancy" -}}
{{- $images := .Values.tenancy.allowedImages | default (list .Values.trainer.image.repository) -}}
{{- toJson (merge (dict "allowedImages" $images) (omit .Values.tenancy "allowedImages")) -}}
{{- end }}

{{/*
A list as one CEL string literal, "a, b", or "none" when empty (the tenancy policy's messages).
*/}}
{{- define "finetune-operator.listed" -}}
{{- . | join ", " | default "none" | toJson -}}
{{- end }}
