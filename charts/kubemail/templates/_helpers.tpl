{{- define "kubemail.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kubemail.labels" -}}
app.kubernetes.io/name: kubemail
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubemail.operatorSelector" -}}
app.kubernetes.io/name: kubemail
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubemail.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{ if .Values.nats.tls.enabled }}tls{{ else }}nats{{ end }}://{{ include "kubemail.fullname" . }}-nats.{{ .Release.Namespace }}.svc:4222
{{- else -}}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the NATS account keys (account.pub, signing-key.nk). */}}
{{- define "kubemail.natsAccountSecret" -}}
{{- .Values.nats.auth.accountSecret | default (printf "%s-nats-account" (include "kubemail.fullname" .)) -}}
{{- end -}}

{{/* The Secret with the bundled NATS' server certificate. */}}
{{- define "kubemail.natsTlsSecret" -}}
{{- printf "%s-nats-tls" (include "kubemail.fullname" .) -}}
{{- end -}}

{{/* The Secret with ca.crt of an external NATS. */}}
{{- define "kubemail.natsCaSecret" -}}
{{- .Values.nats.tls.caSecret | default (printf "%s-nats-ca" (include "kubemail.fullname" .)) -}}
{{- end -}}

{{/* Names in the bundled NATS' server certificate: the Service and every pod of the StatefulSet. */}}
{{- define "kubemail.natsServerNames" -}}
{{- $name := printf "%s-nats" (include "kubemail.fullname" .) -}}
{{- $ns := .Release.Namespace -}}
{{- $names := list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.cluster.local" $name $ns) -}}
{{- range $i, $e := until (int .Values.nats.replicas) -}}
{{- $names = append $names (printf "%s-%d.%s-headless.%s.svc" $name $i $name $ns) -}}
{{- $names = append $names (printf "%s-%d.%s-headless.%s.svc.cluster.local" $name $i $name $ns) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* The Secret whose ca.crt the operator verifies NATS with; empty: the operator's own CA (or no TLS). */}}
{{- define "kubemail.operatorNatsCaSecret" -}}
{{- if .Values.nats.tls.enabled -}}
{{- if .Values.nats.enabled -}}
{{- if .Values.nats.tls.issuerRef.name -}}{{ include "kubemail.natsTlsSecret" . }}{{- end -}}
{{- else -}}
{{ include "kubemail.natsCaSecret" . }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's NATS settings (authentication, TLS, replicas). */}}
{{- define "kubemail.operatorNatsEnv" -}}
- name: KUBEMAIL_NATS_REPLICAS
  value: {{ ternary .Values.nats.replicas .Values.nats.streamReplicas .Values.nats.enabled | quote }}
{{- if .Values.nats.auth.enabled }}
- name: KUBEMAIL_NATS_ACCOUNT_SECRET
  value: {{ include "kubemail.natsAccountSecret" . | quote }}
- name: KUBEMAIL_NATS_CREDENTIALS_VALIDITY
  value: {{ .Values.nats.auth.credentialsValidity | quote }}
{{- end }}
{{- if .Values.nats.enabled }}
{{- if or .Values.nats.auth.enabled .Values.nats.tls.enabled }}
- name: KUBEMAIL_NATS_BOOTSTRAP
  value: "true"
- name: KUBEMAIL_NATS_TLS_SECRET
  value: {{ include "kubemail.natsTlsSecret" . | quote }}
{{- if and .Values.nats.tls.enabled (not .Values.nats.tls.issuerRef.name) }}
- name: KUBEMAIL_NATS_SERVER_NAMES
  value: {{ include "kubemail.natsServerNames" . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "kubemail.operatorNatsCaSecret" . }}
- name: KUBEMAIL_NATS_CA_FILE
  value: /etc/kubemail/nats-ca/ca.crt
{{- end }}
{{- end -}}
