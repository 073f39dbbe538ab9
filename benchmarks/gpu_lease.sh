#!/usr/bin/env bash
# One GPU lease's benchmarks (docs/PERFORMANCE.md, "The next GPU lease"), run from the repo root on the
# lent machine: `bash benchmarks/gpu_lease.sh STAGE OUT_DIR`. A lease is short and comes once: every
# benchmark writes its figures straight into OUT_DIR (its JSON, its log, and its section of a copy of
# RESULTS.md), under a timeout cut to what is left of BUDGET_S, so a crash, a timeout or the device
# tool's own limit keeps whatever was measured before it.
#
#   all       what a lease is for, in one call (a machine handed back between calls costs a new start):
#             the figures never taken first (hero in fp16, then compiled), then the baselines with
#             what the compile left, then the UNet step variants
#   eager     hero (fp16, loss scale), then the reference code's way and plain diffusers
#   compiled  hero with torch.compile alone, its compile time in first_round_s (its eager baseline is
#             the eager stage's hero row, on the same machine)
#
# Every benchmark's output goes into one lease.log: the device tool hands back at most 8 files.
#
# Result names carry the GPU (gpu_round-fp16-h100, …): a lease on another card adds its own tables
# beside the earlier ones. The image lacks some pinned packages: `make gpu-wheels` here puts them in
# .whl/, installed first when present (carry .whl with the call). A rehearsal on a CPU before the lease
# (tests/test_benchmarks.py):
#   DEVICE=cpu SIZE="--arch tiny --images 2 --steps 2" bash benchmarks/gpu_lease.sh all /tmp/out
set -uo pipefail
stage=${1:?usage: gpu_lease.sh all|eager|compiled OUT_DIR}
out=${2:?usage: gpu_lease.sh all|eager|compiled OUT_DIR}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
budget=${BUDGET_S:-560} # seconds this call may take in all: under the device tool's 600 s a command
read -ra size <<<"${SIZE:-}" # the benchmarks' own sizes (SD 1.5, 64 images, 50 steps) unless rehearsing
case $stage in all | eager | compiled) ;; *)
    echo "unknown stage $stage: all, eager or compiled" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
cp benchmarks/RESULTS.md "$out/RESULTS.md"
export BENCH_RESULTS_DIR="$out" BENCH_RESULTS_MD="$out/RESULTS.md" PYTHONUNBUFFERED=1
# a compile killed by a timeout leaves truncated cache files that a rerun on the same machine trips on
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR TORCH_LOGS=recompiles

if [ -d .whl ] && [ "$device" != cpu ]; then # the wheels are for the GPU image's Python
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" # hero_ml from this checkout, uninstalled
# everything the benchmarks import, before any GPU minute goes into them; the GPU's name tags the results
gpu=$("$python" -c "import diffusers, peft, pydantic_settings, torch, hero_ml.engine, re, sys
from peft.helpers import disable_input_dtype_casting
assert '$device' == 'cpu' or torch.cuda.is_available(), 'torch sees no GPU'
name = torch.cuda.get_device_name() if '$device' != 'cpu' else 'cpu'
print(name, torch.__version__, 'diffusers', diffusers.__version__, file=sys.stderr)
print(next(iter(re.findall(r'[A-Z]+[0-9]+', name)), 'gpu').lower() if name != 'cpu' else 'cpu')") || exit 1

# bench CAP RESERVE NAME ARGS...: run one benchmark for at most CAP seconds and what is left of the
# budget but RESERVE (what the benchmarks after it need); the script's exit says whether each ran whole
failed=0
bench() {
    local cap=$1 reserve=$2 name=$3
    shift 3
    local left=$((budget - SECONDS - reserve))
    local seconds=$((cap < left ? cap : left))
    if [ "$seconds" -lt 30 ]; then
        echo "$name: not run ($((left + reserve)) s of the budget left, $reserve s of them kept for the steps after it)" |
            tee -a "$out/lease.log"
        failed=1
        return
    fi
    echo "== $name ($seconds s)" >>"$out/lease.log"
    # -k: a benchmark stuck in a CUDA call past its TERM is killed, leaving the next its turn
    timeout -k 10 "$seconds" "$python" "$@" 2>&1 | tee -a "$out/lease.log"
    local status=$?
    echo "$name: exit $status (of $seconds s)" | tee -a "$out/lease.log" # the log is what comes back whole
    [ "$status" -eq 0 ] || failed=1
}

unet_size=()
[ -n "${SIZE:-}" ] && unet_size=(--arch tiny --batch 2 --warmup 1 --repeats 1)
unet_reserve=0
[ "$stage" = all ] && unet_reserve=90 # a compile that does not finish must leave the UNet step its turn
if [ "$stage" != compiled ]; then # the figure still to take first; reference and diffusers have H200 rows
    bench 150 "$((unet_reserve + 120))" "gpu_round-fp16-$gpu" benchmarks/gpu_round.py --device "$device" \
        "${size[@]}" --setups hero --name "gpu_round-fp16-$gpu"
fi
if [ "$stage" != eager ]; then
    bench 400 "$unet_reserve" "gpu_round-compiled-$gpu" benchmarks/gpu_round.py --device "$device" \
        "${size[@]}" --setups hero-compiled --name "gpu_round-compiled-$gpu"
fi
if [ "$stage" != compiled ]; then # with what the compile left
    bench 200 "$unet_reserve" "gpu_round-baselines-$gpu" benchmarks/gpu_round.py --device "$device" \
        "${size[@]}" --setups reference,diffusers --name "gpu_round-baselines-$gpu"
fi
if [ "$stage" = all ]; then
    bench 120 0 "unet_step-$gpu" benchmarks/unet_step.py --device "$device" "${unet_size[@]}" \
        --name "unet_step-$gpu"
fi
exit "$failed"
