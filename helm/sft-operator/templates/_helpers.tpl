{{/* Chart name, overridable. */}}
{{- define "sft-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "sft-operator.fullname" -}}
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

{{- define "sft-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment selector is immutable). */}}
{{- define "sft-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sft-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Common labels on every object. */}}
{{- define "sft-operator.labels" -}}
{{ include "sft-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sft-operator
helm.sh/chart: {{ include "sft-operator.chart" . }}
{{- end }}

{{- define "sft-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sft-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sft-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding tls.crt, tls.key and ca.crt of the progress endpoint. */}}
{{- define "sft-operator.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "sft-operator.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* DNS names trainer pods use to reach the progress endpoint. */}}
{{- define "sft-operator.dnsNames" -}}
{{- $svc := include "sft-operator.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) | toJson }}
{{- end }}

{{/* The URL trainer pods POST progress to. */}}
{{- define "sft-operator.progressURL" -}}
{{- printf "https://%s.%s.svc:%d" (include "sft-operator.fullname" .) .Release.Namespace (int .Values.service.progressPort) }}
{{- end }}

{{/* trainer.defaults as the operator reads them (SFT_TRAINER_DEFAULTS): JSON without the empty fields. */}}
{{- define "sft-operator.trainerDefaults" -}}
{{- $d := .Values.trainer.defaults }}
{{- $out := dict }}
{{- with $d.nodeSelector }}{{ $_ := set $out "nodeSelector" . }}{{ end }}
{{- with $d.tolerations }}{{ $_ := set $out "tolerations" . }}{{ end }}
{{- with $d.priorityClassName }}{{ $_ := set $out "priorityClassName" . }}{{ end }}
{{- $cache := dict }}
{{- with $d.cache.storageClassName }}{{ $_ := set $cache "storageClassName" . }}{{ end }}
{{- with $d.cache.size }}{{ $_ := set $cache "size" . }}{{ end }}
{{- with $cache }}{{ $_ := set $out "cache" . }}{{ end }}
{{- toJson $out }}
{{- end }}
