#!/usr/bin/env bash
# One GPU lease's benchmarks (docs/PERFORMANCE.md, "The next GPU lease"), run from the repo root on the
# lent machine: `bash benchmarks/gpu_lease.sh STAGE OUT_DIR`. A lease is short and comes once, so each
# benchmark runs under its own timeout and its result files are copied to OUT_DIR as soon as it ends,
# whatever its exit: a crash or a timeout keeps what came before it.
#
#   eager     the UNet step variants, then hero (fp16, loss scale) side by side with the reference
#             code's way and plain diffusers generation (about 7 minutes on an H200)
#   compiled  hero with torch.compile alone, its compile time in first_round_s (the eager baseline is
#             the eager stage's hero row, on the same warm machine)
#
# The image lacks some pinned packages: `make gpu-wheels` here puts them in .whl/, installed first when
# present (carry .whl with the call). A rehearsal on a CPU, before the lease (tests/test_benchmarks.py):
#   DEVICE=cpu SIZE="--arch tiny --images 2 --steps 2" BENCH_RESULTS_DIR=/tmp/r \
#       BENCH_RESULTS_MD=/tmp/r/RESULTS.md bash benchmarks/gpu_lease.sh eager /tmp/out
set -uo pipefail
stage=${1:?usage: gpu_lease.sh eager|compiled OUT_DIR}
out=${2:?usage: gpu_lease.sh eager|compiled OUT_DIR}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
read -ra size <<<"${SIZE:-}" # the benchmarks' own sizes (SD 1.5, 64 images, 50 steps) unless rehearsing
results=${BENCH_RESULTS_DIR:-benchmarks/results}
results_md=${BENCH_RESULTS_MD:-benchmarks/RESULTS.md}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if [ -d .whl ] && [ "$device" != cpu ]; then # the wheels are for the GPU image's Python
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" # hero_ml from this checkout, uninstalled
# everything the benchmarks import, before any GPU minute goes into them
"$python" -c "import diffusers, peft, pydantic_settings, torch, hero_ml.engine
from peft.helpers import disable_input_dtype_casting
assert '$device' == 'cpu' or torch.cuda.is_available(), 'torch sees no GPU'
print(torch.cuda.get_device_name() if '$device' != 'cpu' else 'cpu', torch.__version__,
      'diffusers', diffusers.__version__)" || exit 1

# bench SECONDS NAME ARGS...: run one benchmark, log it, and copy what it wrote
bench() {
    local seconds=$1 name=$2
    shift 2
    timeout "$seconds" "$python" "$@" 2>&1 | tee "$out/$name.log"
    local status=$?
    cp "$results/$name.json" "$results_md" "$out"/ 2>/dev/null
    echo "$name: exit $status"
}

case $stage in
eager)
    unet_size=()
    [ -n "${SIZE:-}" ] && unet_size=(--arch tiny --batch 2 --warmup 1 --repeats 1)
    bench 120 unet_step benchmarks/unet_step.py --device "$device" "${unet_size[@]}"
    bench 420 gpu_round-fp16 benchmarks/gpu_round.py --device "$device" "${size[@]}" \
        --setups hero,reference,diffusers --name gpu_round-fp16
    ;;
compiled)
    bench 540 gpu_round-compiled benchmarks/gpu_round.py --device "$device" "${size[@]}" \
        --setups hero-compiled --name gpu_round-compiled
    ;;
*)
    echo "unknown stage $stage: eager or compiled" >&2
    exit 2
    ;;
esac
