#!/usr/bin/env bash
# A Prefect process worker for work pool POOL: it runs the deployments' flow runs as subprocesses
# with this environment (PREFECT_API_URL, HERO_* settings and secrets, HERO_CONFIG_FILE).
#
#   infra/prefect-worker.sh start POOL       # health on $HERO_WORKER_PORT (default 8181)
#   infra/prefect-worker.sh start POOL GPU   # one worker per GPU: sees only GPU (CUDA_VISIBLE_DEVICES),
#                                            # runs one flow run at a time; health on port + GPU
#   infra/prefect-worker.sh start POOL 0,1   # a GPU group: each of its runs samples and learns on all
#                                            # of them (HERO_MODEL__PROCESSES); health on port + 0
#   infra/prefect-worker.sh stop POOL [GPU | GROUP]
#
# Several runs share a machine's GPUs with one worker per GPU (or GPU group): the pool's concurrency
# limit (hero deploy --gpus N: the workers) caps the runs in flight, each worker's limit of 1 keeps two
# runs off one GPU, and a suspended run (waiting for its annotators) holds neither.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
POOL="${2:-}"
GPUS="${3:-}"
INDEX='(0|[1-9][0-9]{0,2})'
IFS=, read -ra GROUP <<<"$GPUS"
if [[ -z $POOL || ! ${1:-} =~ ^(start|stop)$ || ! $GPUS =~ ^($INDEX(,$INDEX)*)?$ ||
    $(printf '%s\n' "${GROUP[@]}" | sort | uniq -d) ]]; then
    echo "usage: $0 start | stop POOL [GPU index | GPU indices, comma-separated, each once]" >&2
    exit 2
fi
PORT="${HERO_WORKER_PORT:-8181}"
NAME="worker-$POOL"
LIMIT=()
if [[ -n $GPUS ]]; then
    NAME="worker-$POOL-gpu${GPUS//,/-}"
    PORT=$((PORT + ${GPUS%%,*}))
    LIMIT=(--limit 1 --name "$(hostname)-$POOL-gpu${GPUS//,/-}")
    export CUDA_VISIBLE_DEVICES="$GPUS"
    # its runs span its GPUs, process k on the k-th (a single GPU's: one process), whatever the
    # worker's environment or config file says
    export HERO_MODEL__PROCESSES="${#GROUP[@]}"
    ((${#GROUP[@]} == 1)) || export HERO_MODEL__DEVICE=cuda
fi

case "${1:-}" in
start)
    need prefect
    need curl
    : "${PREFECT_API_URL:?set PREFECT_API_URL to the Prefect server (infra/prefect-server.sh)}"
    curl -sf -o /dev/null -m 10 "$PREFECT_API_URL/health" || {
        shown=$(sed -E 's#//[^/]*@#//…@#' <<<"$PREFECT_API_URL") # credentials in the URL are not shown
        echo "error: the Prefect API at $shown does not answer: start it (infra/prefect-server.sh)" >&2
        exit 1
    }
    PREFECT_WORKER_WEBSERVER_HOST=127.0.0.1 PREFECT_WORKER_WEBSERVER_PORT="$PORT" \
        start_service "$NAME" "http://127.0.0.1:$PORT/health" 120 \
        prefect worker start --pool "$POOL" --type process --with-healthcheck "${LIMIT[@]}"
    ;;
stop) stop_service "$NAME" ;;
esac
