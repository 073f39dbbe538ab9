#!/usr/bin/env bash
# The webhook receiver (`hero serve-webhooks`) on 127.0.0.1: Label Studio's annotation events resume
# the suspended training runs whose round they complete.
#
#   infra/webhook-receiver.sh start   # on $HERO_WEBHOOK_PORT (default 8765)
#   infra/webhook-receiver.sh stop
#
# Needs PREFECT_API_URL and the workers' HERO_* settings (storage, Label Studio, the webhook secret).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PORT="${HERO_WEBHOOK_PORT:-8765}"

case "${1:-}" in
start)
    need hero
    start_service webhook-receiver "http://127.0.0.1:$PORT/health" 60 \
        hero serve-webhooks --host 127.0.0.1 --port "$PORT"
    echo "webhooks: http://127.0.0.1:$PORT/webhooks/label-studio"
    ;;
stop) stop_service webhook-receiver ;;
*)
    echo "usage: $0 start | stop" >&2
    exit 2
    ;;
esac
