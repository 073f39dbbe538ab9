#!/usr/bin/env bash
# An MLflow tracking server with a model registry on 127.0.0.1: SQLite backend in $HERO_INFRA_STATE,
# artifacts proxied to an S3 bucket (clients need no S3 credentials, the server has them).
#
#   infra/mlflow-server.sh start     # on $HERO_MLFLOW_PORT (default 5000)
#   infra/mlflow-server.sh stop
#
# Artifacts go to s3://$HERO_MLFLOW_BUCKET (default hero-mlflow) at $MLFLOW_S3_ENDPOINT_URL (default:
# the S3 server of infra/s3-server.sh); start that first. For AWS, unset MLFLOW_S3_ENDPOINT_URL's
# default by setting it to the empty string.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PORT="${HERO_MLFLOW_PORT:-5000}"
BUCKET="${HERO_MLFLOW_BUCKET:-hero-mlflow}"
export MLFLOW_S3_ENDPOINT_URL="${MLFLOW_S3_ENDPOINT_URL-http://127.0.0.1:${HERO_S3_PORT:-9000}}"
if [ "$MLFLOW_S3_ENDPOINT_URL" = "http://127.0.0.1:${HERO_S3_PORT:-9000}" ]; then
    # infra/s3-server.sh's moto takes any keys; anywhere else (AWS, a real MinIO) the caller's or the
    # AWS chain's own (an IAM role) must not be replaced by made-up ones
    export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
fi
export MLFLOW_DISABLE_TELEMETRY=true

case "${1:-}" in
start)
    need mlflow
    start_service mlflow "http://127.0.0.1:$PORT/health" 120 \
        mlflow server --host 127.0.0.1 --port "$PORT" --workers 1 \
        --backend-store-uri "sqlite:///$HERO_INFRA_STATE/mlflow.db" \
        --artifacts-destination "s3://$BUCKET/" --serve-artifacts
    echo "MLflow: http://127.0.0.1:$PORT (artifacts in s3://$BUCKET/)"
    ;;
stop) stop_service mlflow ;;
*)
    echo "usage: $0 start | stop" >&2
    exit 2
    ;;
esac
