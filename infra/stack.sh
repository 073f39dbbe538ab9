#!/usr/bin/env bash
# The whole production stack as local processes on 127.0.0.1, without Docker: S3 (moto), MLflow,
# Label Studio, Prefect, the deployments, a worker per pool and the webhook receiver, in that order.
#
#   infra/stack.sh start   # then: prefect deployment run hero-training/on-demand --param run_id=NAME
#   infra/stack.sh stop
#
# Needs the settings of docs/OPERATIONS.md in the environment (HERO_CONFIG_FILE pointing S3, MLflow,
# Label Studio and the webhook at these services; the secrets), and `make install label-studio`.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/lib.sh"
export PREFECT_API_URL="http://127.0.0.1:${HERO_PREFECT_PORT:-4200}/api"
GPU_POOL="${HERO_GPU_POOL:-hero-gpu}" SERVICE_POOL="${HERO_SERVICE_POOL:-hero-services}"

case "${1:-}" in
start)
    need hero
    : "${HERO_ORCHESTRATION__WEBHOOK_SECRET:?set it (docs/OPERATIONS.md, section 1): the webhook receiver, started last, needs it}"
    trap 'echo "error: the stack is partly up; infra/stack.sh stop stops what started" >&2' ERR
    "$HERE/s3-server.sh" start hero-runs hero-mlflow
    "$HERE/mlflow-server.sh" start
    # its S3 and the webhook receiver are on this host: lift Label Studio's block of loopback addresses
    HERO_LABEL_STUDIO_ALLOW_LOOPBACK="${HERO_LABEL_STUDIO_ALLOW_LOOPBACK:-true}" "$HERE/label-studio.sh" start
    "$HERE/prefect-server.sh" start
    hero deploy --gpu-pool "$GPU_POOL" --service-pool "$SERVICE_POOL"
    HERO_WORKER_PORT="${HERO_WORKER_PORT:-8181}" "$HERE/prefect-worker.sh" start "$GPU_POOL"
    HERO_WORKER_PORT="${HERO_SERVICE_WORKER_PORT:-8180}" "$HERE/prefect-worker.sh" start "$SERVICE_POOL"
    "$HERE/webhook-receiver.sh" start
    ;;
stop)
    "$HERE/webhook-receiver.sh" stop
    "$HERE/prefect-worker.sh" stop "$SERVICE_POOL"
    "$HERE/prefect-worker.sh" stop "$GPU_POOL"
    "$HERE/prefect-server.sh" stop
    "$HERE/label-studio.sh" stop
    "$HERE/mlflow-server.sh" stop
    "$HERE/s3-server.sh" stop
    ;;
*)
    echo "usage: $0 start | stop" >&2
    exit 2
    ;;
esac
