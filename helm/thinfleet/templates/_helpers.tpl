{{/* Names ---------------------------------------------------------------------------------- */}}
{{- define "thinfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "thinfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "thinfleet.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "thinfleet.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "thinfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "thinfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "thinfleet.workerSelector" -}}
app.kubernetes.io/name: {{ include "thinfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "thinfleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "thinfleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "thinfleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* CPU sizing (README "Threads and concurrency") -------------------------------------------
  cpuCores: whole CPUs of the worker container: its CPU limit (the cgroup quota llama.cpp
  really gets), else its request; "1500m" -> 1, "2" -> 2, never below 1.
  concurrency: worker.concurrency when set, else cpuCores / worker.threadsPerChild (>= 1). */}}
{{- define "thinfleet.cpuCores" -}}
{{- $cpu := toString (dig "limits" "cpu" (dig "requests" "cpu" "1" .Values.worker.resources) .Values.worker.resources) -}}
{{- $cores := 0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $cores = div (trimSuffix "m" $cpu | atoi) 1000 -}}
{{- else -}}
{{- $cores = $cpu | float64 | floor | int -}}
{{- end -}}
{{- max 1 $cores -}}
{{- end -}}

{{- define "thinfleet.concurrency" -}}
{{- if .Values.worker.concurrency -}}
{{- .Values.worker.concurrency -}}
{{- else -}}
{{- max 1 (div (include "thinfleet.cpuCores" . | atoi) (max 1 .Values.worker.threadsPerChild)) -}}
{{- end -}}
{{- end -}}

{{/* Grace period: the hard task time limit (Celery's warm shutdown waits for the running
  ticket) plus a margin for the prefetched ticket's requeue and the process exit. */}}
{{- define "thinfleet.gracePeriodSeconds" -}}
{{- add (.Values.worker.taskTimeLimitS | int) (.Values.worker.shutdownMarginS | int) -}}
{{- end -}}

{{/* Redis URL parts for KEDA's redis-lists scaler. */}}
{{- define "thinfleet.redisAddress" -}}
{{- $u := urlParse .Values.redis.url -}}
{{- if contains ":" $u.host -}}{{ $u.host }}{{- else -}}{{ printf "%s:6379" $u.host }}{{- end -}}
{{- end -}}

{{- define "thinfleet.redisDatabase" -}}
{{- $u := urlParse .Values.redis.url -}}
{{- default "0" (trimPrefix "/" $u.path) -}}
{{- end -}}

{{- define "thinfleet.redisTLS" -}}
{{- if hasPrefix "rediss://" .Values.redis.url -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{- define "thinfleet.taxonomyConfigMap" -}}
{{- default (printf "%s-taxonomy" (include "thinfleet.fullname" .)) .Values.taxonomy.existingConfigMap -}}
{{- end -}}

{{/* Redis connection env, shared by the worker, its initContainer and Flower. */}}
{{- define "thinfleet.redisEnv" -}}
- name: THINFLEET_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- if .Values.redis.username }}
- name: THINFLEET_REDIS_USERNAME
  value: {{ .Values.redis.username | quote }}
{{- end }}
{{- if .Values.redis.existingSecret }}
- name: THINFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.passwordKey }}
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: THINFLEET_REDIS_TLS_CA_FILE
  value: /etc/thinfleet/redis-tls/{{ .Values.redis.tls.caKey }}
{{- end }}
{{- end -}}

{{/* S3 env. No AWS_* variable is ever set empty: boto3 reads environment keys before web
  identity (IRSA / workload identity), and an empty AWS_ACCESS_KEY_ID breaks that chain. */}}
{{- define "thinfleet.s3Env" -}}
{{- if .Values.s3.endpointUrl }}
- name: THINFLEET_S3_ENDPOINT_URL
  value: {{ .Values.s3.endpointUrl | quote }}
{{- end }}
{{- if .Values.s3.region }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- end }}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.s3.existingSecret }}
      key: {{ .Values.s3.secretAccessKeyKey }}
{{- end }}
{{- end -}}

{{/* What the model fetch (initContainer) and the worker share: which model, where cached. */}}
{{- define "thinfleet.modelEnv" -}}
- name: THINFLEET_TAXONOMY
  value: /etc/thinfleet/taxonomy/taxonomy.yaml
- name: THINFLEET_MODEL_CACHE_DIR
  value: /var/cache/thinfleet/models
{{- if .Values.model.manifest }}
- name: THINFLEET_MODEL_MANIFEST
  value: {{ .Values.model.manifest | quote }}
{{- end }}
{{- if .Values.model.manifestSha256 }}
- name: THINFLEET_MANIFEST_SHA256
  value: {{ .Values.model.manifestSha256 | quote }}
{{- end }}
{{- if .Values.model.uri }}
- name: THINFLEET_MODEL_URI
  value: {{ .Values.model.uri | quote }}
{{- end }}
{{- if .Values.model.sha256 }}
- name: THINFLEET_MODEL_SHA256
  value: {{ .Values.model.sha256 | quote }}
{{- end }}
{{- end -}}
