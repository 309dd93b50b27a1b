{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "kafka-rerank.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name; objects add -worker, -gateway, -topics (pod names stay short). */}}
{{- define "kafka-rerank.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kafka-rerank.workerName" -}}
{{- printf "%s-worker" (include "kafka-rerank.fullname" .) -}}
{{- end -}}

{{- define "kafka-rerank.gatewayName" -}}
{{- printf "%s-gateway" (include "kafka-rerank.fullname" .) -}}
{{- end -}}

{{- define "kafka-rerank.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kafka-rerank.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kafka-rerank.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{/* Labels -------------------------------------------------------------------------------- */}}

{{- define "kafka-rerank.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kafka-rerank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "worker"). */}}
{{- define "kafka-rerank.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "kafka-rerank.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kafka-rerank.componentLabels" -}}
{{ include "kafka-rerank.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Values ------------------------------------------------------------------------------- */}}

{{/* A value as an env string: whole numbers without an exponent (YAML numbers are floats
     in Helm, and 1209600000 would print as 1.2096e+09), the rest as they print. */}}
{{- define "kafka-rerank.str" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* Kafka security --------------------------------------------------------------------- */}}

{{- define "kafka-rerank.sasl" -}}
{{- has .Values.kafka.security.protocol (list "SASL_PLAINTEXT" "SASL_SSL") -}}
{{- end -}}

{{- define "kafka-rerank.tls" -}}
{{- has .Values.kafka.security.protocol (list "SSL" "SASL_SSL") -}}
{{- end -}}

{{/* Whether the pods mount the TLS files: a CA or a client certificate, over TLS. */}}
{{- define "kafka-rerank.tlsFiles" -}}
{{- $tls := .Values.kafka.security.tls -}}
{{- if and (eq (include "kafka-rerank.tls" .) "true") (or $tls.caSecret.name $tls.clientCertSecret.name) -}}
true
{{- else -}}
false
{{- end -}}
{{- end -}}

{{/* Refuses settings that cannot work, at render time, one message each. */}}
{{- define "kafka-rerank.validate" -}}
{{- $k := .Values.kafka -}}
{{- if not $k.bootstrapServers -}}
{{- fail "kafka.bootstrapServers is required (host:port[,host:port...])" -}}
{{- end -}}
{{- if not (has $k.security.protocol (list "PLAINTEXT" "SSL" "SASL_PLAINTEXT" "SASL_SSL")) -}}
{{- fail (printf "kafka.security.protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, not %q" $k.security.protocol) -}}
{{- end -}}
{{- if eq (include "kafka-rerank.sasl" .) "true" -}}
{{- if not (has $k.security.sasl.mechanism (list "PLAIN" "SCRAM-SHA-256" "SCRAM-SHA-512")) -}}
{{- fail (printf "kafka.security.sasl.mechanism must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512, not %q" $k.security.sasl.mechanism) -}}
{{- end -}}
{{- if not $k.security.sasl.existingSecret -}}
{{- fail (printf "kafka.security.sasl.existingSecret is required with %s: a Secret holding the user name and the password" $k.security.protocol) -}}
{{- end -}}
{{- end -}}
{{- $w := .Values.worker -}}
{{- $needed := add (int64 (ceil (float64 $w.drainTimeoutS))) 10 -}}
{{- if and (not (kindIs "invalid" $w.terminationGracePeriodSeconds)) (le (int64 $w.terminationGracePeriodSeconds) $needed) -}}
{{- fail (printf "worker.terminationGracePeriodSeconds (%v) must exceed worker.drainTimeoutS + 10 s (%d): the worker drains, then takes up to 10 s to commit and leave the group" $w.terminationGracePeriodSeconds $needed) -}}
{{- end -}}
{{- if .Values.topics.enabled -}}
{{- $partitions := int64 .Values.topics.partitions -}}
{{- if and (not .Values.keda.enabled) (gt (int64 $w.replicas) $partitions) -}}
{{- fail (printf "worker.replicas (%v) is more than topics.partitions (%d): a partition feeds at most one worker, the others would sit idle" $w.replicas $partitions) -}}
{{- end -}}
{{- if and .Values.keda.enabled (gt (int64 .Values.keda.maxReplicaCount) $partitions) -}}
{{- fail (printf "keda.maxReplicaCount (%v) is more than topics.partitions (%d): a partition feeds at most one worker" .Values.keda.maxReplicaCount $partitions) -}}
{{- end -}}
{{- end -}}
{{- $reserved := dict
  "RERANK_BOOTSTRAP_SERVERS" "kafka.bootstrapServers"
  "RERANK_REQUEST_TOPIC" "kafka.requestTopic"
  "RERANK_REPLY_TOPIC" "kafka.replyTopic"
  "RERANK_DLQ_TOPIC" "kafka.dlqTopic"
  "RERANK_GROUP_ID" "kafka.groupId"
  "RERANK_SECURITY_PROTOCOL" "kafka.security.protocol"
  "RERANK_SASL_MECHANISM" "kafka.security.sasl.mechanism"
  "RERANK_SASL_USERNAME" "kafka.security.sasl.existingSecret"
  "RERANK_SASL_PASSWORD" "kafka.security.sasl.existingSecret"
  "RERANK_SSL_CAFILE" "kafka.security.tls.caSecret"
  "RERANK_SSL_CERTFILE" "kafka.security.tls.clientCertSecret"
  "RERANK_SSL_KEYFILE" "kafka.security.tls.clientCertSecret"
  "RERANK_SSL_PASSWORD" "kafka.security.tls.clientCertSecret.passwordKey"
  "RERANK_GROUP_INSTANCE_ID" "worker.staticMembership"
  "RERANK_SESSION_TIMEOUT_MS" "worker.sessionTimeoutMs"
  "RERANK_DRAIN_TIMEOUT_S" "worker.drainTimeoutS"
  "RERANK_HTTP_HOST" "(the chart: 0.0.0.0)"
  "RERANK_HTTP_PORT" "worker.httpPort"
  "RERANK_MODEL" "worker.model"
  "RERANK_DEVICE" "worker.device"
  "RERANK_DELIVERY" "worker.delivery"
  "RERANK_MAX_BATCH_TOKENS" "worker.maxBatchTokens"
  "RERANK_LOG_LEVEL" "worker.logLevel"
  "RERANK_LOG_FORMAT" "worker.logFormat"
-}}
{{- range $name, $_ := $w.env -}}
{{- if hasKey $reserved $name -}}
{{- fail (printf "worker.env.%s: set %s instead" $name (get $reserved $name)) -}}
{{- end -}}
{{- end -}}
{{- $gatewayReserved := dict
  "RERANK_GATEWAY_PORT" "gateway.port"
  "RERANK_GATEWAY_API_TOKEN" "gateway.apiTokenSecret"
  "RERANK_GATEWAY_MAX_CONCURRENCY" "gateway.maxConcurrency"
  "RERANK_GATEWAY_TIMEOUT_S" "gateway.timeoutS"
  "RERANK_LOG_LEVEL" "gateway.logLevel"
-}}
{{- range $name, $_ := .Values.gateway.env -}}
{{- if or (hasKey $gatewayReserved $name) (and (hasKey $reserved $name) (hasPrefix "kafka." (get $reserved $name))) -}}
{{- fail (printf "gateway.env.%s: set %s instead" $name (get (merge (dict) $gatewayReserved $reserved) $name)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Kafka connection's variables, the same for the workers and the gateway. */}}
{{- define "kafka-rerank.kafkaEnv" -}}
{{- $k := .Values.kafka -}}
- name: RERANK_BOOTSTRAP_SERVERS
  value: {{ $k.bootstrapServers | quote }}
- name: RERANK_REQUEST_TOPIC
  value: {{ $k.requestTopic | quote }}
- name: RERANK_REPLY_TOPIC
  value: {{ $k.replyTopic | quote }}
- name: RERANK_GROUP_ID
  value: {{ $k.groupId | quote }}
- name: RERANK_SECURITY_PROTOCOL
  value: {{ $k.security.protocol | quote }}
{{- if eq (include "kafka-rerank.sasl" .) "true" }}
- name: RERANK_SASL_MECHANISM
  value: {{ $k.security.sasl.mechanism | quote }}
- name: RERANK_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $k.security.sasl.existingSecret | quote }}
      key: {{ $k.security.sasl.usernameKey | quote }}
- name: RERANK_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.security.sasl.existingSecret | quote }}
      key: {{ $k.security.sasl.passwordKey | quote }}
{{- end }}
{{- if eq (include "kafka-rerank.tls" .) "true" }}
{{- $tls := $k.security.tls }}
{{- if $tls.caSecret.name }}
- name: RERANK_SSL_CAFILE
  value: {{ printf "%s/ca.crt" $tls.mountPath | quote }}
{{- end }}
{{- if $tls.clientCertSecret.name }}
- name: RERANK_SSL_CERTFILE
  value: {{ printf "%s/client.crt" $tls.mountPath | quote }}
- name: RERANK_SSL_KEYFILE
  value: {{ printf "%s/client.key" $tls.mountPath | quote }}
{{- if $tls.clientCertSecret.passwordKey }}
- name: RERANK_SSL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $tls.clientCertSecret.name | quote }}
      key: {{ $tls.clientCertSecret.passwordKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The volume with the TLS files (ca.crt, client.crt, client.key), when there are any. */}}
{{- define "kafka-rerank.tlsVolume" -}}
{{- if eq (include "kafka-rerank.tlsFiles" .) "true" -}}
{{- $tls := .Values.kafka.security.tls -}}
- name: kafka-tls
  projected:
    defaultMode: 0444
    sources:
      {{- if $tls.caSecret.name }}
      - secret:
          name: {{ $tls.caSecret.name | quote }}
          items:
            - key: {{ $tls.caSecret.key | quote }}
              path: ca.crt
      {{- end }}
      {{- if $tls.clientCertSecret.name }}
      - secret:
          name: {{ $tls.clientCertSecret.name | quote }}
          items:
            - key: {{ $tls.clientCertSecret.certKey | quote }}
              path: client.crt
            - key: {{ $tls.clientCertSecret.keyKey | quote }}
              path: client.key
      {{- end }}
{{- end -}}
{{- end -}}

{{- define "kafka-rerank.tlsVolumeMount" -}}
{{- if eq (include "kafka-rerank.tlsFiles" .) "true" -}}
- name: kafka-tls
  mountPath: {{ .Values.kafka.security.tls.mountPath | quote }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The worker's termination grace: the value, or the drain + 10 s to commit and leave + 5 s. */}}
{{- define "kafka-rerank.workerGrace" -}}
{{- $w := .Values.worker -}}
{{- if kindIs "invalid" $w.terminationGracePeriodSeconds -}}
{{- add (int64 (ceil (float64 $w.drainTimeoutS))) 15 -}}
{{- else -}}
{{- int64 $w.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* KEDA's name for a SASL mechanism. */}}
{{- define "kafka-rerank.kedaSasl" -}}
{{- get (dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512") .Values.kafka.security.sasl.mechanism -}}
{{- end -}}

{{/* Whether KEDA needs a TriggerAuthentication: SASL credentials or TLS files. */}}
{{- define "kafka-rerank.kedaAuth" -}}
{{- or (eq (include "kafka-rerank.sasl" .) "true") (eq (include "kafka-rerank.tlsFiles" .) "true") -}}
{{- end -}}

{{/* The Secret holding the gateway's bearer token: the one named, or the chart's own. */}}
{{- define "kafka-rerank.gatewayTokenSecret" -}}
{{- .Values.gateway.apiTokenSecret.name | default (printf "%s-token" (include "kafka-rerank.gatewayName" .)) -}}
{{- end -}}
