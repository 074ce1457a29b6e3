#!/bin/bash
# Head pod entrypoint: the Ray head node plus the batonserve router as the Ray driver.
# KubeRay puts its generated `ray start --head ... --block` line in $KUBERAY_GEN_RAY_START_CMD
# (the pod has the ray.io/overwrite-container-cmd annotation). Either process ending ends the
# pod with that process's status, so Kubernetes restarts it; SIGTERM drains the router first,
# then stops Ray. Needs bash >= 5.1 (`wait -n PID...`).
# Usage: head-entrypoint.sh CONFIG_FILE
set -uo pipefail

config="${1:?usage: head-entrypoint.sh CONFIG_FILE}"
ray_wait_s="${BATONSERVE_RAY_WAIT_S:-180}"
ray_pid=""
serve_pid=""

stop() {
    # Router first: it stops admitting and finishes in-flight streams within its grace period.
    if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
        kill -TERM "$serve_pid" 2>/dev/null
        wait "$serve_pid" 2>/dev/null
    fi
    if [ -n "$ray_pid" ] && kill -0 "$ray_pid" 2>/dev/null; then
        kill -TERM "$ray_pid" 2>/dev/null
        wait "$ray_pid" 2>/dev/null
    fi
}
trap 'echo "head-entrypoint: SIGTERM, draining" >&2; stop; exit 143' TERM INT

if [ -z "${KUBERAY_GEN_RAY_START_CMD:-}" ]; then
    echo "head-entrypoint: KUBERAY_GEN_RAY_START_CMD is not set; this pod must be created by KubeRay" >&2
    exit 1
fi
ulimit -n "${RAY_START_ULIMIT_OPEN_FILES:-65536}" 2>/dev/null || true

# KubeRay quotes some flags for a shell (e.g. --resources='{...}'), hence eval; exec so that
# $ray_pid is `ray start` itself and our SIGTERM reaches it, not a subshell.
eval "exec $KUBERAY_GEN_RAY_START_CMD" &
ray_pid=$!

# The driver may only connect once the local GCS answers (bounded wait).
gcs="127.0.0.1:${RAY_PORT:-6379}"
waited=0
until ray health-check --address "$gcs" >/dev/null 2>&1; do
    if ! kill -0 "$ray_pid" 2>/dev/null; then
        wait "$ray_pid"
        rc=$?
        echo "head-entrypoint: ray start exited with $rc before the GCS came up" >&2
        exit $((rc == 0 ? 1 : rc))
    fi
    if [ "$waited" -ge "$ray_wait_s" ]; then
        echo "head-entrypoint: Ray GCS at $gcs not up after ${ray_wait_s}s" >&2
        stop
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done

batonserve serve --config "$config" &
serve_pid=$!

wait -n "$ray_pid" "$serve_pid"
rc=$?
if ! kill -0 "$serve_pid" 2>/dev/null; then
    echo "head-entrypoint: batonserve serve exited with $rc; stopping Ray" >&2
else
    echo "head-entrypoint: Ray exited with $rc; stopping the router" >&2
fi
stop
exit "$rc"
