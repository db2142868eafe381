#!/usr/bin/env bash
# Everything that needs a GPU, in one run that fits a short device session (8 minutes in all):
#   1. the dependencies (60 s: a cold `import torch` alone takes 5-15 s on a fresh machine): installs what is
#      missing from bench/wheelhouse/, offline, into a fresh folder that bench/site links to only once the install
#      has succeeded (a part cut at its limit leaves no half-installed package), then prints whatever is still
#      missing (bench/deps.py);
#   2. the kernel benchmarks on their quick shapes, and packed attention at 16k tokens (bench.attention);
#   3. the GPU tests;
#   4. the generator against HF at the target batches, and the decode step eager and as a CUDA graph.
# The decode step under torch.compile (minutes of compiling) is not part of it; run it on its own:
#     python -m bench.decode_step --device cuda --impls eager,compiled
# Each part has its own time limit (PARTS below), so one that hangs does not take the others with it. JSON results
# land in bench/results/ (or $BENCH_RESULTS); with $OUT set (e.g. a lent device machine's output folder) this run's
# results and its log are copied there after every part, so a run stopped at any point returns what it measured.
# The exit status is 1 if any part failed.
#
# bench/wheelhouse/ is not in git (.gitignore): for a machine without network, build it here with
#     bash bench/wheelhouse.sh 3.12      # the GPU machine's Python version
# and carry it with the working tree (a lent device machine: name bench/wheelhouse in the run's carry list).
#
#     bash bench/gpu_check.sh            # python3 from PATH, or PYTHON=/path/to/python
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export BENCH_RESULTS=${BENCH_RESULTS:-bench/results}
export PYTHONPATH="$PWD/bench/site${PYTHONPATH:+:$PYTHONPATH}"  # what part 1 installed, once it is complete
GPU_TESTS="tests/test_attention.py tests/test_decode_attention.py tests/test_logprob.py tests/test_sampling.py tests/test_generate.py"
GPU_TESTS+=" tests/test_sdpa_backends.py"
PARTS=(  # limit in seconds | name | arguments of $PY; 480 s in all (tests/test_gpu_check.py holds it to that)
    "60|dependencies|-m bench.deps --install bench/wheelhouse"
    "45|bench.logprob|-m bench.logprob --quick"
    "35|bench.sampling|-m bench.sampling --quick"
    "30|bench.decode|-m bench.decode --quick"
    "35|bench.attention|-m bench.attention --quick"
    "120|gpu tests|-m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS"
    "115|bench.generate|-m bench.generate --device cuda --quick --batches 1,64,256"
    "40|bench.decode_step|-m bench.decode_step --device cuda --impls eager,graph"
)
mkdir -p "$BENCH_RESULTS"
start=$(mktemp)  # results newer than this file are this run's
log=$(mktemp)
trap 'rm -f "$start" "$log"' EXIT
failed=()

copy_out() {  # this run's results and log so far, into $OUT
    [ -n "${OUT:-}" ] || return 0
    find "$BENCH_RESULTS" -maxdepth 1 -name '*.json' -newer "$start" -exec cp {} "$OUT"/ \;
    cp "$log" "$OUT"/gpu_check.log
}

for part in "${PARTS[@]}"; do
    IFS="|" read -r limit name args <<< "$part"
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s)" | tee -a "$log"
    # shellcheck disable=SC2086  # the arguments split into words on purpose
    timeout "$limit" "$PY" $args 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    if [ "$status" -ne 0 ]; then
        failed+=("$name")
        [ "$status" -eq 124 ] && echo "=== $name: stopped at its limit of ${limit}s" | tee -a "$log"
    fi
    copy_out
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" | tee -a "$log"
    copy_out
    exit 1
fi
echo "all parts passed" | tee -a "$log"
copy_out
