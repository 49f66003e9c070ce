{{/* Names, labels, the mode the values select, and the checks that values.schema.json cannot express. */}}

{{- define "audience.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "audience.fullname" -}}
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

{{- define "audience.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "audience.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audience.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "audience.labels" -}}
helm.sh/chart: {{ include "audience.chart" . }}
{{ include "audience.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "audience.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "audience.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "audience.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The label that admits a pod through the NetworkPolicy. */}}
{{- define "audience.clientLabel" -}}
{{ include "audience.fullname" . }}-client
{{- end }}

{{/* "true" in Redis mode (a URL in the values or in a Secret), "" in embedded mode. */}}
{{- define "audience.redisMode" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret }}true{{ end }}
{{- end }}

{{- define "audience.workloadKind" -}}
{{- if .Values.persistence.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* The Secret holding the token file, or "" when authentication is off. */}}
{{- define "audience.authSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.generateToken }}
{{- include "audience.fullname" . }}-auth
{{- end }}
{{- end }}

{{- define "audience.authSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}tokens.toml{{ end }}
{{- end }}

{{/* The name the certificate must hold for probes and the test. */}}
{{- define "audience.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "audience.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{- define "audience.scheme" -}}
{{- if .Values.tls.existingSecret }}https{{ else }}http{{ end }}
{{- end }}

{{/* Mount points inside the container. */}}
{{- define "audience.paths" -}}
config: /etc/audience/audience.toml
tls: /etc/audience/tls
auth: /etc/audience/auth
data: /data
{{- end }}

{{/*
Values that parse but do not make a working release: refused here with the reason, since
values.schema.json cannot relate one value to another.
*/}}
{{- define "audience.validate" -}}
{{- $redis := include "audience.redisMode" . }}
{{- if and .Values.redis.url .Values.redis.existingSecret }}
{{- fail "redis.url and redis.existingSecret are both set: set one (existingSecret when the URL carries a password)" }}
{{- end }}
{{- if regexMatch "://[^/@]*:[^/@]*@" .Values.redis.url }}
{{- fail "redis.url holds a password, which would be written into the ConfigMap: put the URL in a Secret and set redis.existingSecret" }}
{{- end }}
{{- if and (not $redis) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but embedded mode (no redis.url or redis.existingSecret) runs exactly one pod: several replicas need Redis" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (not $redis) .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs Redis mode (redis.url or redis.existingSecret): embedded mode runs exactly one pod" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas is above autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.metrics.dashboard.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.dashboard.enabled needs metrics.enabled: the dashboard would show no data" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled: there is no metrics port to scrape" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.existingSecret) }}
{{- fail "tls.clientAuth needs tls.existingSecret (its ca.crt signs the client certificates)" }}
{{- end }}
{{- if and (not (include "audience.authSecret" .)) (not .Values.auth.allowUnauthenticated) }}
{{- fail "authentication is off (no auth.existingSecret, auth.generateToken false): set one of them, or auth.allowUnauthenticated=true to serve without tokens" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.service.port)) }}
{{- fail "metrics.port must differ from service.port" }}
{{- end }}
{{- $grace := int (default 25 (get .Values.config "shutdown_grace_secs")) }}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- if ge (add $grace $preStop) (int .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "lifecycle.preStopSleepSeconds (%d) plus config.shutdown_grace_secs (%d) must stay below terminationGracePeriodSeconds (%d): Kubernetes kills the pod before its calls finish and its log is flushed" $preStop $grace (int .Values.terminationGracePeriodSeconds)) }}
{{- end }}
{{- range $key := list "listen" "data_dir" "redis_url" "metrics_listen" "tls_cert" "tls_key" "tls_client_ca" "auth_file" "allow_unauthenticated" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart (from service, persistence, redis, metrics, tls and auth values): remove it from config" $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The configuration the server reads: what the chart manages, then the user's `config` map.
*/}}
{{- define "audience.config" -}}
{{- $paths := include "audience.paths" . | fromYaml }}
{{- $managed := dict "listen" (printf "0.0.0.0:%d" (int .Values.service.port)) }}
{{- if .Values.persistence.enabled }}
{{- $_ := set $managed "data_dir" $paths.data }}
{{- else if not (include "audience.redisMode" .) }}
{{- $_ := set $managed "data_dir" $paths.data }}
{{- end }}
{{- if .Values.redis.url }}
{{- $_ := set $managed "redis_url" .Values.redis.url }}
{{- end }}
{{- if .Values.metrics.enabled }}
{{- $_ := set $managed "metrics_listen" (printf "0.0.0.0:%d" (int .Values.metrics.port)) }}
{{- end }}
{{- if .Values.tls.existingSecret }}
{{- $_ := set $managed "tls_cert" (printf "%s/tls.crt" $paths.tls) }}
{{- $_ := set $managed "tls_key" (printf "%s/tls.key" $paths.tls) }}
{{- if .Values.tls.clientAuth }}
{{- $_ := set $managed "tls_client_ca" (printf "%s/ca.crt" $paths.tls) }}
{{- end }}
{{- end }}
{{- if include "audience.authSecret" . }}
{{- $_ := set $managed "auth_file" (printf "%s/tokens.toml" $paths.auth) }}
{{- else }}
{{- $_ := set $managed "allow_unauthenticated" true }}
{{- end }}
{{- include "audience.toml" (dict "table" (merge $managed (deepCopy .Values.config)) "prefix" "") }}
{{- end }}

{{/*
A map as TOML: scalars first, then one [section] per nested map. Values are written as JSON,
whose strings, numbers (whole numbers without a fraction: Helm reads every number as a float,
which toToml would print as 7.0) and arrays of them are TOML too.
*/}}
{{- define "audience.toml" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .table }}
{{- if not (kindIs "map" $value) }}
{{ $key }} = {{ toJson $value }}
{{- end }}
{{- end }}
{{- range $key, $value := .table }}
{{- if kindIs "map" $value }}

[{{ $prefix }}{{ $key }}]
{{- include "audience.toml" (dict "table" $value "prefix" (printf "%s%s." $prefix $key)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The probe action: native gRPC when the port is plaintext; with TLS (which kubelet's gRPC
probe does not speak) `audience health` over TLS, to the server name the certificate holds
(mapped to the pod's own address by hostAliases).
*/}}
{{- define "audience.probeAction" -}}
{{- if .Values.tls.existingSecret }}
exec:
  command:
{{- include "audience.healthCommand" (dict "root" . "host" (include "audience.tlsServerName" .)) | trim | nindent 4 }}
{{- else }}
grpc:
  port: {{ .Values.service.port }}
{{- end }}
{{- end }}

{{/* `audience health` against host:port, with the TLS and client-certificate flags it needs. */}}
{{- define "audience.healthCommand" -}}
{{- $root := .root }}
{{- $paths := include "audience.paths" $root | fromYaml }}
- /usr/local/bin/audience
- health
- --addr
- {{ printf "%s://%s:%d" (include "audience.scheme" $root) .host (int $root.Values.service.port) }}
{{- if $root.Values.tls.existingSecret }}
- --tls-ca
- {{ $paths.tls }}/ca.crt
{{- if $root.Values.tls.clientAuth }}
- --tls-cert
- {{ $paths.tls }}/tls.crt
- --tls-key
- {{ $paths.tls }}/tls.key
{{- end }}
{{- end }}
- --timeout-secs
- "4"
{{- end }}
