{{/*
Names, labels and Secret names shared by the templates.
*/}}

{{- define "imapgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the release name, prefixed with the chart name unless the release already contains it.
Truncated to 63 characters (the limit of a DNS label, which some Kubernetes names are).
*/}}
{{- define "imapgate.fullname" -}}
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

{{- define "imapgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imapgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imapgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imapgate.labels" -}}
helm.sh/chart: {{ include "imapgate.chart" . }}
{{ include "imapgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imapgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imapgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Service for the admin port that the ServiceMonitor scrapes (the main Service never exposes it).
*/}}
{{- define "imapgate.metricsServiceName" -}}
{{- printf "%s-metrics" (include "imapgate.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
The ClusterIP Service for the listeners with service: internal.
*/}}
{{- define "imapgate.internalServiceName" -}}
{{- printf "%s-internal" (include "imapgate.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
service.ipFamilyPolicy and service.ipFamilies, for both Services (empty: the cluster's default).
*/}}
{{- define "imapgate.ipFamilies" -}}
{{- with .Values.service.ipFamilyPolicy }}
ipFamilyPolicy: {{ . }}
{{- end }}
{{- with .Values.service.ipFamilies }}
ipFamilies:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The most pods the release can run at once: replicaCount, or autoscaling.maxReplicas.
*/}}
{{- define "imapgate.maxPods" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.maxReplicas | int }}{{ else }}{{ .Values.replicaCount | int }}{{ end }}
{{- end }}

{{/*
The fewest pods the release runs: replicaCount, or autoscaling.minReplicas.
*/}}
{{- define "imapgate.minPods" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas | int }}{{ else }}{{ .Values.replicaCount | int }}{{ end }}
{{- end }}

{{- define "imapgate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "imapgate.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "imapgate.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
auth.store.backend: file (the users file from a Secret), sqlite (a PersistentVolumeClaim) or postgres.
*/}}
{{- define "imapgate.store" -}}{{ .Values.auth.store.backend }}{{- end }}

{{/*
The PersistentVolumeClaim that holds the SQLite database: persistence.existingClaim, else the
chart's own "<fullname>-data".
*/}}
{{- define "imapgate.dataClaimName" -}}
{{- default (printf "%s-data" (include "imapgate.fullname" . | trunc 58 | trimSuffix "-")) .Values.auth.store.sqlite.persistence.existingClaim }}
{{- end }}

{{- define "imapgate.usersSecretName" -}}
{{- default (printf "%s-users" (include "imapgate.fullname" .)) .Values.users.existingSecret }}
{{- end }}

{{/*
auth.mfa.default as the gateway spells it. YAML 1.1 reads an unquoted `off` in a values file as
the boolean false, so false means off.
*/}}
{{- define "imapgate.mfaDefault" -}}
{{- if kindIs "bool" .Values.auth.mfa.default }}off{{ else }}{{ .Values.auth.mfa.default }}{{ end }}
{{- end }}

{{- define "imapgate.keysSecretName" -}}
{{- default (printf "%s-keys" (include "imapgate.fullname" .)) .Values.auth.keyRing.existingSecret }}
{{- end }}

{{/*
The Secret with a backend's master password. Call with (dict "root" $ "backend" $backend).
*/}}
{{- define "imapgate.masterSecretName" -}}
{{- default (printf "%s-%s-master" (include "imapgate.fullname" .root) .backend.name) .backend.masterPassword.existingSecret }}
{{- end }}

{{/*
Paths inside the container. The config refers to them; the Deployment mounts them.
*/}}
{{- define "imapgate.configPath" -}}/etc/imapgate/imapgate.yaml{{- end }}
{{- define "imapgate.tlsDir" -}}/etc/imapgate/tls{{- end }}
{{- define "imapgate.usersDir" -}}/etc/imapgate/users{{- end }}
{{- define "imapgate.keysDir" -}}/etc/imapgate/keys{{- end }}
{{- define "imapgate.adminDir" -}}/etc/imapgate/admin{{- end }}
{{- define "imapgate.redisDir" -}}/etc/imapgate/redis{{- end }}
{{- define "imapgate.redisCaDir" -}}/etc/imapgate/redis-ca{{- end }}
{{- define "imapgate.postgresDir" -}}/etc/imapgate/postgres{{- end }}
{{- define "imapgate.postgresCaDir" -}}/etc/imapgate/postgres-ca{{- end }}
{{- define "imapgate.dataDir" -}}/var/lib/imapgate{{- end }}
{{- define "imapgate.backendDir" -}}/etc/imapgate/backends/{{ . }}{{- end }}
{{- define "imapgate.oauthDir" -}}/etc/imapgate/oauth/{{ . }}{{- end }}
{{- define "imapgate.portalDir" -}}/etc/imapgate/portal{{- end }}

{{/*
A duration as the gateway writes it (500ms, 30s, 15m, 12h, 30d) in milliseconds.
*/}}
{{- define "imapgate.durationMs" -}}
{{- $d := . | toString }}
{{- $amount := regexFind "^[0-9]+" $d | int64 }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" $d) $d }}
{{- mul $amount (get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 "d" 86400000) $unit) }}
{{- end }}

{{/*
The `helm test` pod's labels: its own name, so that no Service, PDB or HPA of the release selects it.
*/}}
{{- define "imapgate.testLabels" -}}
app.kubernetes.io/name: {{ printf "%s-test" (include "imapgate.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{/*
Every listener, as YAML with the list under "items" (use: (include "imapgate.listeners" . |
fromYaml).items): the IMAP ones (listeners), then with smtp.enabled SMTP submission's and with
pop3.enabled POP3's, each with its protocol.
*/}}
{{- define "imapgate.listeners" -}}
{{- $all := list }}
{{- range .Values.listeners }}{{ $all = append $all (merge (dict "protocol" "imap") .) }}{{ end }}
{{- if .Values.smtp.enabled }}
{{- range .Values.smtp.listeners }}{{ $all = append $all (merge (dict "protocol" "smtp") .) }}{{ end }}
{{- end }}
{{- if .Values.pop3.enabled }}
{{- range .Values.pop3.listeners }}{{ $all = append $all (merge (dict "protocol" "pop3") .) }}{{ end }}
{{- end }}
{{- toYaml (dict "items" $all) }}
{{- end }}

{{/*
The name in the SMTP greeting and EHLO reply: smtp.hostname, else the first tls.certManager.dnsNames
entry that is no wildcard, else with the portal its mail host; empty: the gateway's default (the
pod's host name).
*/}}
{{- define "imapgate.smtpHostname" -}}
{{- $name := .Values.smtp.hostname }}
{{- if and (not $name) .Values.tls.certManager.enabled (not .Values.tls.selfSigned) }}
{{- range .Values.tls.certManager.dnsNames }}{{ if and (not $name) (not (hasPrefix "*" .)) }}{{ $name = . }}{{ end }}{{ end }}
{{- end }}
{{- if and (not $name) .Values.portal.enabled }}{{ $name = include "imapgate.portalImapHost" . }}{{ end }}
{{- $name }}
{{- end }}

{{/*
The listener `helm test` connects to: test.listener, else the first with tls implicit, else the
first (STARTTLS). Returned as YAML (fromYaml it).
*/}}
{{- define "imapgate.testListener" -}}
{{- $found := dict }}
{{- if .Values.test.listener }}
{{- range .Values.listeners }}{{ if eq .name $.Values.test.listener }}{{ $found = . }}{{ end }}{{ end }}
{{- if not $found }}
{{- fail (printf "test.listener: no listener is named %q" .Values.test.listener) }}
{{- end }}
{{- else }}
{{- range .Values.listeners }}{{ if and (not $found) (eq .tls "implicit") }}{{ $found = . }}{{ end }}{{ end }}
{{- if not $found }}{{ $found = first .Values.listeners }}{{ end }}
{{- end }}
{{- toYaml $found }}
{{- end }}

{{/*
The name `helm test` verifies the gateway's certificate for: test.serverName, else the first
tls.certManager.dnsNames entry that is no wildcard; empty: not verified.
*/}}
{{- define "imapgate.testServerName" -}}
{{- if .Values.test.serverName }}
{{- .Values.test.serverName }}
{{- else if and .Values.tls.certManager.enabled (not .Values.tls.selfSigned) }}
{{- $name := "" }}
{{- range .Values.tls.certManager.dnsNames }}{{ if and (not $name) (not (hasPrefix "*" .)) }}{{ $name = . }}{{ end }}{{ end }}
{{- $name }}
{{- end }}
{{- end }}

{{/*
The portal (portal.enabled): its ClusterIP Service, the TLS Secret of its Ingress, the host people
open (publicUrl's), and what it tells mail clients.
*/}}
{{- define "imapgate.portalServiceName" -}}
{{- printf "%s-portal" (include "imapgate.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "imapgate.portalTlsSecretName" -}}
{{- default (printf "%s-portal-tls" (include "imapgate.fullname" . | trunc 52 | trimSuffix "-")) .Values.portal.ingress.tls.secretName }}
{{- end }}

{{- define "imapgate.portalHost" -}}
{{- regexReplaceAll "^https://([^:/]+).*$" .Values.portal.publicUrl "${1}" }}
{{- end }}

{{/*
portal.mail.imapHost, else the first tls.certManager.dnsNames entry that is no wildcard (the name
the gateway's certificate is for), else publicUrl's host.
*/}}
{{- define "imapgate.portalImapHost" -}}
{{- $name := .Values.portal.mail.imapHost }}
{{- if and (not $name) .Values.tls.certManager.enabled }}
{{- range .Values.tls.certManager.dnsNames }}{{ if and (not $name) (not (hasPrefix "*" .)) }}{{ $name = . }}{{ end }}{{ end }}
{{- end }}
{{- default (include "imapgate.portalHost" .) $name }}
{{- end }}

{{/*
The Service port of the first listener on the main Service with that tls ("implicit" or
"starttls"); empty when there is none. Call with (dict "root" $ "tls" "implicit").
*/}}
{{- define "imapgate.mainServicePort" -}}
{{- $port := "" }}
{{- range .root.Values.listeners }}
{{- if and (not $port) (eq .tls $.tls) (eq (.service | default "main") "main") }}{{ $port = .servicePort | int | toString }}{{ end }}
{{- end }}
{{- $port }}
{{- end }}
