#!/usr/bin/env bash
# A Prefect process worker for work pool POOL: it runs the deployments' flow runs as subprocesses
# with this environment (PREFECT_API_URL, HERO_* settings and secrets, HERO_CONFIG_FILE).
#
#   infra/prefect-worker.sh start POOL   # health on $HERO_WORKER_PORT (default 8181)
#   infra/prefect-worker.sh stop POOL
set -euo pipefail
source "$(dirname "$0")/lib.sh"
POOL="${2:-}"
if [[ -z $POOL || ! ${1:-} =~ ^(start|stop)$ ]]; then
    echo "usage: $0 start | stop POOL" >&2
    exit 2
fi
PORT="${HERO_WORKER_PORT:-8181}"

case "${1:-}" in
start)
    need prefect
    : "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server (infra/prefect-server.sh)}"
    PREFECT_WORKER_WEBSERVER_HOST=127.0.0.1 PREFECT_WORKER_WEBSERVER_PORT="$PORT" \
        start_service "worker-$POOL" "http://127.0.0.1:$PORT/health" 120 \
        prefect worker start --pool "$POOL" --type process --with-healthcheck
    ;;
stop) stop_service "worker-$POOL" ;;
esac
