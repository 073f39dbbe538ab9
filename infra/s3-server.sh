#!/usr/bin/env bash
# An S3-compatible server on 127.0.0.1 for development and tests: moto in server mode (in memory;
# everything is lost at stop). Production uses MinIO or AWS S3 (infra/compose.yaml).
#
#   infra/s3-server.sh start [BUCKET...]   # start on $HERO_S3_PORT (default 9000), create the buckets
#   infra/s3-server.sh stop
#
# Credentials: any key pair works with moto; the scripts and tests use the values of
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, defaulting to "test" / "test".
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PORT="${HERO_S3_PORT:-9000}"
ENDPOINT="http://127.0.0.1:$PORT"

case "${1:-}" in
start)
    shift
    need moto_server
    start_service s3 "$ENDPOINT/moto-api/" 60 moto_server -H 127.0.0.1 -p "$PORT"
    for bucket in "$@"; do
        AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}" AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}" \
            python - "$ENDPOINT" "$bucket" <<'PY'
import sys

import boto3

client = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1")
if sys.argv[2] not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
    client.create_bucket(Bucket=sys.argv[2])
print(f"bucket s3://{sys.argv[2]} ready")
PY
    done
    echo "S3 endpoint: $ENDPOINT"
    ;;
stop) stop_service s3 ;;
*)
    echo "usage: $0 start [BUCKET...] | stop" >&2
    exit 2
    ;;
esac
