#!/usr/bin/env bash
# A Prefect API server on 127.0.0.1 (SQLite in $HERO_INFRA_STATE/prefect), for deployments, work
# pools and flow runs that suspend while annotators work.
#
#   infra/prefect-server.sh start    # on $HERO_PREFECT_PORT (default 4200); API at /api
#   infra/prefect-server.sh stop
#
# Point clients at it with PREFECT_API_URL=http://127.0.0.1:$HERO_PREFECT_PORT/api.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PORT="${HERO_PREFECT_PORT:-4200}"
export PREFECT_HOME="$HERO_INFRA_STATE/prefect"
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED="${PREFECT_UI_ENABLED:-true}"
mkdir -p "$PREFECT_HOME"

case "${1:-}" in
start)
    need prefect
    start_service prefect "http://127.0.0.1:$PORT/api/health" 120 \
        prefect server start --host 127.0.0.1 --port "$PORT"
    echo "Prefect API: http://127.0.0.1:$PORT/api"
    ;;
stop) stop_service prefect ;;
*)
    echo "usage: $0 start | stop" >&2
    exit 2
    ;;
esac
