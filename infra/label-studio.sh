#!/usr/bin/env bash
# A Label Studio server on 127.0.0.1 with SQLite, an admin user and an API token, created
# non-interactively. Label Studio lives in its own virtual environment (it pins packages that break
# the app's): `make label-studio` builds it in .venv-label-studio from infra/label-studio-constraints.txt.
#
#   infra/label-studio.sh start    # on $HERO_LABEL_STUDIO_PORT (default 8080)
#   infra/label-studio.sh stop
#
# The admin is $LABEL_STUDIO_USERNAME / $LABEL_STUDIO_PASSWORD, the API token $LABEL_STUDIO_USER_TOKEN
# (legacy token, fixed at the first start of a data folder; defaults below are for development only).
# Data (SQLite, uploads) lives in $HERO_INFRA_STATE/label-studio. HERO_LABEL_STUDIO_ALLOW_LOOPBACK=true
# lets Label Studio call loopback addresses (webhooks and S3 on 127.0.0.1, for tests); production keeps
# its default SSRF protection.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${HERO_LABEL_STUDIO_PORT:-8080}"
VENV="${HERO_LABEL_STUDIO_VENV:-$REPO/.venv-label-studio}"
DATA="$HERO_INFRA_STATE/label-studio"

case "${1:-}" in
start)
    [[ -x $VENV/bin/label-studio ]] || {
        echo "error: no Label Studio in $VENV; build it with 'make label-studio'" >&2
        exit 2
    }
    mkdir -p "$DATA/home"
    # the admin is made at a data folder's first start (or when LABEL_STUDIO_USERNAME names one); a
    # later start without the variables would add a second admin with the development password and
    # token, so it gets none
    admin=()
    if [[ ! -f $DATA/label_studio.sqlite3 || -n ${LABEL_STUDIO_USERNAME:-} ]]; then
        if [[ -z ${LABEL_STUDIO_PASSWORD:-} || -z ${LABEL_STUDIO_USER_TOKEN:-} ]]; then
            echo "note: Label Studio's admin takes this script's development password or token, written in" \
                "the repository: set LABEL_STUDIO_USERNAME, LABEL_STUDIO_PASSWORD and LABEL_STUDIO_USER_TOKEN" \
                "before the first start of anything people reach" >&2
        fi
        admin=(LABEL_STUDIO_USERNAME="${LABEL_STUDIO_USERNAME:-admin@hero.local}"
            LABEL_STUDIO_PASSWORD="${LABEL_STUDIO_PASSWORD:-hero-admin-password}"
            LABEL_STUDIO_USER_TOKEN="${LABEL_STUDIO_USER_TOKEN:-hero-dev-token-0123456789}")
    fi
    banned_subnets=true
    [[ ${HERO_LABEL_STUDIO_ALLOW_LOOPBACK:-false} == true ]] && banned_subnets=false
    # env -i: Label Studio reads plain USERNAME / PASSWORD variables too; give it only what it needs
    start_service label-studio "http://127.0.0.1:$PORT/health" 180 env -i \
        PATH="$VENV/bin:/usr/bin:/bin" HOME="$DATA/home" LANG=C.UTF-8 \
        LABEL_STUDIO_BASE_DATA_DIR="$DATA" \
        "${admin[@]}" \
        LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
        LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
        USE_DEFAULT_BANNED_SUBNETS="$banned_subnets" \
        SENTRY_DSN= FRONTEND_SENTRY_DSN= \
        "$VENV/bin/label-studio" start --internal-host 127.0.0.1 --port "$PORT" \
        --host "http://127.0.0.1:$PORT" --no-browser
    echo "Label Studio: http://127.0.0.1:$PORT"
    ;;
stop) stop_service label-studio ;;
*)
    echo "usage: $0 start | stop" >&2
    exit 2
    ;;
esac
