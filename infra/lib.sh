# Shared by the service scripts: start a process in the background with its pid and log in
# $HERO_INFRA_STATE (default .infra/ under the repository), wait until it answers, stop it.
# Services bind to 127.0.0.1 only.

HERO_INFRA_STATE="${HERO_INFRA_STATE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.infra}"
# the state holds Label Studio's API token and every service's database: the operator's alone (the
# folder, not a umask: what the services and their flow runs write elsewhere stays as they make it)
mkdir -p "$HERO_INFRA_STATE" && chmod 700 "$HERO_INFRA_STATE"

# need TOOL: fail with a hint when a command is missing (the repository's venv holds them all)
need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "error: '$1' not found on PATH; run 'make install' and 'source .venv/bin/activate'" >&2
        exit 2
    }
}

# alive PID: the process exists and is not a zombie (a killed service nobody reaped is gone)
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $state && $state != Z* ]]
}

# started PID: when the process started, in clock ticks since boot (/proc/PID/stat's 22nd field, read
# after the command name, which may hold spaces): no locale or time zone changes it
started() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -ra fields <<<"${stat##*) }"
    echo "${fields[19]}"
}

# ours NAME: NAME's pid file names the process this script started. A pid is reused (the state folder
# outlives a reboot or a crash): the start time recorded beside it tells a stranger apart.
ours() {
    local pidfile="$HERO_INFRA_STATE/$1.pid" startfile="$HERO_INFRA_STATE/$1.started" pid
    [[ -f $pidfile && -f $startfile ]] || return 1
    pid=$(cat "$pidfile")
    alive "$pid" && [[ "$(started "$pid")" == "$(cat "$startfile")" ]]
}

# start_service NAME URL_TO_POLL TIMEOUT_S COMMAND... : start unless ours runs already, wait for URL
start_service() {
    local name=$1 url=$2 timeout=$3
    shift 3
    local pidfile="$HERO_INFRA_STATE/$name.pid" log="$HERO_INFRA_STATE/$name.log" tool
    for tool in curl setsid ps pgrep; do # without them a start waits its whole timeout, or loses its pid
        command -v "$tool" >/dev/null 2>&1 || {
            echo "error: '$tool' not found on PATH (curl; setsid: util-linux; ps, pgrep: procps)" >&2
            exit 2
        }
    done
    if ours "$name"; then
        echo "$name already running (pid $(cat "$pidfile"))"
        return 0
    fi
    rm -f "$pidfile" "$HERO_INFRA_STATE/$name.started" # stale: its process is gone, or another's now
    # something else answering there would pass for ours while ours fails to bind
    if curl -s -o /dev/null -m 5 "$url"; then
        echo "error: $url already answers, but not a $name this script started: stop that process or" \
            "give $name another port" >&2
        exit 1
    fi
    # setsid: the service gets its own process group, so stop kills its children too
    setsid "$@" >"$log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
    started $! >"$HERO_INFRA_STATE/$name.started" || true # gone already: said below
    local deadline=$((SECONDS + timeout))
    until curl -sf -o /dev/null -m 5 "$url"; do # -m: a listener that never answers must not hang us
        if ! alive "$(cat "$pidfile")"; then
            echo "error: $name exited during start; its log ($log) ends with:" >&2
            tail -n 20 "$log" >&2
            rm -f "$pidfile" "$HERO_INFRA_STATE/$name.started"
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "error: $name did not answer $url within ${timeout}s; log: $log" >&2
            stop_service "$name"
            exit 1
        fi
        sleep 0.5
    done
    echo "$name up (pid $(cat "$pidfile")), log $log"
}

stop_service() {
    local name=$1 pidfile="$HERO_INFRA_STATE/$1.pid"
    if [[ ! -f $pidfile ]]; then
        echo "$name not running"
        return 0
    fi
    local pid
    pid=$(cat "$pidfile")
    # never signal a group that may be a stranger's: a group of that number whose leader is gone may be
    # another program's after a reboot, so it is named, not killed
    if ! ours "$name"; then
        rm -f "$pidfile" "$HERO_INFRA_STATE/$name.started"
        if alive "$pid"; then
            echo "$name not running: its stale pid file named pid $pid, another process now (or one an" \
                "older script started without its start time: if so, stop it with kill -- -$pid); removed"
        elif pgrep -g "$pid" >/dev/null 2>&1; then
            echo "$name not running: its process $pid is gone, but processes of group $pid remain" \
                "(pgrep -a -g $pid); if they are its children, stop them with kill -- -$pid"
        else
            echo "$name not running (its stale pid file named pid $pid, which is gone: removed)"
        fi
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        alive "$pid" || break
        sleep 0.25
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile" "$HERO_INFRA_STATE/$name.started"
    echo "$name stopped"
}
