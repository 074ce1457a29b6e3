{{/* Names: the RayCluster, and every object's prefix. Kept short: KubeRay appends suffixes to it. */}}
{{- define "batonserve.name" -}}
{{- .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "batonserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "batonserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "batonserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Pods are selected by the labels KubeRay sets and never lets templates override. */}}
{{- define "batonserve.clusterSelector" -}}
ray.io/cluster: {{ include "batonserve.fullname" . }}
{{- end -}}

{{- define "batonserve.headSelector" -}}
ray.io/cluster: {{ include "batonserve.fullname" . }}
ray.io/node-type: head
{{- end -}}

{{- define "batonserve.serviceAccountName" -}}
{{- $sa := .Values.kubernetes.service_account -}}
{{- if $sa.create -}}
{{- default (include "batonserve.fullname" .) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{- define "batonserve.image" -}}
{{- $img := .Values.kubernetes.image -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* The ServeConfig the router reads: the values themselves (Helm adds `global` to subcharts). */}}
{{- define "batonserve.config" -}}
{{- toYaml (omit .Values "global") -}}
{{- end -}}

{{/* The hash in the head template's `checksum/config`: the config without the pools' scale
     (replicas, min_replicas, max_replicas), which the running controller picks up from the
     mounted file, so a replicas-only upgrade changes no pod template (KubeRay's own Recreate
     hash leaves these out too). */}}
{{- define "batonserve.configChecksum" -}}
{{- $pools := list -}}
{{- range .Values.pools -}}
{{- $pools = append $pools (omit . "replicas" "min_replicas" "max_replicas") -}}
{{- end -}}
{{- $v := omit .Values "global" "pools" -}}
{{- $_ := set $v "pools" $pools -}}
{{- toYaml $v | sha256sum -}}
{{- end -}}

{{/* Ray's own ports in every pod; the router's ports must differ from them. */}}
{{- define "batonserve.rayMetricsPort" -}}8080{{- end -}}

{{/* Checks the schema cannot express; each failure names the value to change. */}}
{{- define "batonserve.validate" -}}
{{- $r := .Values.router -}}
{{- if has (toString $r.host) (list "127.0.0.1" "localhost" "::1") -}}
{{- fail (printf "router.host: %q is loopback; in Kubernetes the router must listen on the pod's address, set it to 0.0.0.0" $r.host) -}}
{{- end -}}
{{- if has (toString $r.metrics_host) (list "127.0.0.1" "localhost" "::1") -}}
{{- fail (printf "router.metrics_host: %q is loopback; set it to 0.0.0.0 so Prometheus can scrape it" $r.metrics_host) -}}
{{- end -}}
{{- if ne (toString .Values.ray.address) "auto" -}}
{{- fail (printf "ray.address: must be \"auto\" in Kubernetes (the router joins the Ray head in its own pod), got %q" .Values.ray.address) -}}
{{- end -}}
{{- if eq (int $r.port) (int $r.metrics_port) -}}
{{- fail (printf "router.port and router.metrics_port: must differ, both are %v" $r.port) -}}
{{- end -}}
{{- if and $r.http_enabled (has (int $r.http_port) (list (int $r.port) (int $r.metrics_port))) -}}
{{- fail (printf "router.http_port: must differ from router.port and router.metrics_port, got %v" $r.http_port) -}}
{{- end -}}
{{- range $key := list "port" "http_port" "metrics_port" -}}
{{- if has (int (get $r $key)) (list 6379 8265 10001 8080 52365) -}}
{{- fail (printf "router.%s: %v is a port Ray uses in the pod (6379, 8265, 10001, 8080, 52365); pick another" $key (get $r $key)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $p := .Values.pools -}}
{{- $replicas := hasKey $p "replicas" | ternary $p.replicas 1 | int -}}
{{- $min := $p.min_replicas | default 0 | int -}}
{{- $max := $p.max_replicas | default 0 | int -}}
{{- if and (gt $max 0) (gt $replicas $max) -}}
{{- fail (printf "pools[%d] (%s).replicas: %d is above max_replicas %d" $i $p.name $replicas $max) -}}
{{- end -}}
{{- if gt $min $replicas -}}
{{- fail (printf "pools[%d] (%s).min_replicas: %d is above replicas %d" $i $p.name $min $replicas) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment of every container: writable HOME on a read-only root, no usage stats. */}}
{{- define "batonserve.env" -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- range $k, $v := .Values.kubernetes.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{- define "batonserve.podSecurityContext" -}}
{{- $sc := .Values.kubernetes.security_context -}}
runAsNonRoot: true
runAsUser: {{ $sc.run_as_user }}
runAsGroup: {{ $sc.run_as_group }}
fsGroup: {{ $sc.fs_group }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "batonserve.containerSecurityContext" -}}
{{- $sc := .Values.kubernetes.security_context -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ $sc.read_only_root_filesystem }}
runAsNonRoot: true
runAsUser: {{ $sc.run_as_user }}
runAsGroup: {{ $sc.run_as_group }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Writable scratch on a read-only root: /tmp, Ray's session dir, and the object store. */}}
{{- define "batonserve.volumes" -}}
- name: tmp
  emptyDir: {}
- name: ray-tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.kubernetes.shm_size }}
    sizeLimit: {{ . }}
    {{- end }}
{{- $mc := .Values.kubernetes.model_cache }}
{{- if $mc.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-models" (include "batonserve.fullname" .)) $mc.existing_claim }}
    readOnly: {{ $mc.read_only }}
{{- end }}
{{- end -}}

{{- define "batonserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: ray-tmp
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- $mc := .Values.kubernetes.model_cache }}
{{- if $mc.enabled }}
- name: models
  mountPath: {{ $mc.mount_path }}
  readOnly: {{ $mc.read_only }}
{{- end }}
{{- end -}}

{{/* Kubernetes tolerations from the snake_case config form. */}}
{{- define "batonserve.tolerations" -}}
{{- $out := list -}}
{{- range . -}}
{{- $t := dict "operator" (.operator | default "Equal") -}}
{{- with .key }}{{ $_ := set $t "key" . }}{{ end -}}
{{- with .value }}{{ $_ := set $t "value" . }}{{ end -}}
{{- with .effect }}{{ $_ := set $t "effect" . }}{{ end -}}
{{- if not (kindIs "invalid" .toleration_seconds) }}{{ $_ := set $t "tolerationSeconds" (int .toleration_seconds) }}{{ end -}}
{{- $out = append $out $t -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* nodeSelector, tolerations, affinity of a head or pool `kubernetes` section. */}}
{{- define "batonserve.placement" -}}
{{- with .node_selector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- include "batonserve.tolerations" . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* One NetworkPolicy peer from (namespace labels, pod labels); an empty map is left out. */}}
{{- define "batonserve.peer" -}}
{{- $peer := dict -}}
{{- with index . 0 }}{{ $_ := set $peer "namespaceSelector" (dict "matchLabels" .) }}{{ end -}}
{{- with index . 1 }}{{ $_ := set $peer "podSelector" (dict "matchLabels" .) }}{{ end -}}
{{- toYaml (list $peer) -}}
{{- end -}}
