#!/usr/bin/env bash
# Everything that needs a GPU, in one run that fits a short device session: the GPU tests, then the
# generator, decode-step and kernel benchmarks on their quick shapes (the generator at the target batches).
# Each part has its own time limit (12 minutes in all at most), so one that hangs does not take the others
# with it. JSON results land in bench/results/ (and are copied to $OUT when it is set, e.g. on a lent device
# machine); the exit status is 1 if any part failed.
#
#     bash bench/gpu_check.sh            # python3 from PATH, or PYTHON=/path/to/python
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
failed=()

part() {  # part SECONDS NAME COMMAND...: run one part under a time limit and remember a failure
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
    timeout "$limit" "$@" || failed+=("$name")
}

part 150 "gpu tests" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
part 240 "bench.generate" "$PY" -m bench.generate --device cuda --quick --batches 1,64,256
part 180 "bench.decode_step" "$PY" -m bench.decode_step --device cuda
part 45 "bench.logprob" "$PY" -m bench.logprob --quick
part 45 "bench.sampling" "$PY" -m bench.sampling --quick
part 40 "bench.decode" "$PY" -m bench.decode --quick

if [ -n "${OUT:-}" ]; then
    cp bench/results/*.json "$OUT"/ 2>/dev/null
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all parts passed"
