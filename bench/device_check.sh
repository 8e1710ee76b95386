#!/usr/bin/env bash
# GPU check, run on a lent GPU machine (no network there): builds the CUDA extension with that
# machine's own python3/torch/triton, runs the GPU tests and the benchmarks at paper sizes,
# writes bench/results/<gpu>-<date>.json and prints a short table last. Budget: < 8 minutes,
# enforced: every stage runs under a timeout cut from one deadline (BUDGET_S, default 450 s),
# and an overrun stops pytest with SIGINT (so it still prints what it has), then SIGKILL 30 s
# later (a kernel that hangs). Each benchmark suite is its own run, so finished suites are kept,
# and gets at most SUITE_S seconds (default 180). The JSON and the log are also copied to $OUT
# (what the device tool brings back) after every stage and again at the exit, so a run killed
# from outside still returns what it finished. After bench_vit, when the machine has
# Nsight Compute, `ncu` profiles one block of the exact ViT-S (bench/kernel_profile.py) into
# bench/results/<gpu>-<date>.ncu.txt (also copied to $OUT) and prints a line a kernel, if at
# least 60 s are left by then (the headline benchmark comes first).
#
# GPU tests: `-k cuda` selects the `cuda`-marked tests and every test parametrised over
# conftest.DEVICES with "cuda" (its id holds "cuda"), which `-m cuda` alone would leave out.
#
#   bash bench/device_check.sh            # everything
#   BENCH=bench/bench_neuron.py bash bench/device_check.sh   # one suite
#   TESTS=tests/test_spike_matmul.py bash bench/device_check.sh   # one test file
#   TESTS=none BENCH=ncu bash bench/device_check.sh   # only the Nsight Compute profile
#   TESTS=none BENCH=bench/bench_vit.py BENCH_K=exact bash bench/device_check.sh   # pytest -k
#
# SpikingJelly (a baseline) is installed from bench/.wheels/ when that ignored folder holds its
# wheel (`make wheels`, then carry bench/.wheels to the machine); without it the SpikingJelly
# ratios are left out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

deadline=$(( $(date +%s) + ${BUDGET_S:-450} ))
# seconds left before the deadline, less $1 kept for the stages after this one (at least 10)
left() { local s=$(( deadline - $(date +%s) - ${1:-0} )); echo $(( s < 10 ? 10 : s )); }
# a benchmark suite's share: what is left, but at most SUITE_S (one slow suite must not
# starve the ones after it)
suite_limit() { local s; s=$(left 15); local c=${SUITE_S:-180}; echo $(( s < c ? s : c )); }
# SIGINT first: pytest then reports and pytest-benchmark still saves the finished cases
limit() { timeout -s INT -k 30 "$@"; }

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'" || exit 1
gpu=$(python3 -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
day=$(date +%Y-%m-%d)
mkdir -p bench/results
json="bench/results/${gpu}-${day}.json"
log="bench/results/${gpu}-${day}.log"
ncu_report="bench/results/${gpu}-${day}.ncu.txt"
# Through the device tool only what is under $OUT comes back: hand the results over on any
# exit, a failed or cut-short run included.
save_out() { [ -n "${OUT:-}" ] && cp -f "$json" "$log" "$ncu_report" "$OUT"/ 2>/dev/null; return 0; }
trap save_out EXIT

echo "== build (CUDA extension) on ${gpu}"
start=$(date +%s)
SPIKEKERNELS_CUDA=1 MAX_JOBS=16 timeout -k 10 "$(left 300)" \
  python3 -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -5
build_rc=${PIPESTATUS[0]}
echo "   build took $(( $(date +%s) - start ))s (rc=${build_rc})"
if [ "$build_rc" -ne 0 ]; then
  echo "BUILD FAILED: not testing a stale or CPU-only extension" >&2
  exit 1
fi
if [ -d bench/.wheels ]; then
  timeout 60 python3 -m pip install -q --no-deps --no-index --find-links bench/.wheels \
    spikingjelly loguru tqdm 2>&1 | tail -2
  timeout 60 python3 -m pip install -q --no-deps --no-index --find-links bench/.wheels \
    pytest-xdist execnet 2>&1 | tail -2
fi
timeout 60 python3 -m spikekernels.info
# Spike-Softmax falls back to the PyTorch reference on CUDA when the extension lacks its CUDA
# kernel: make sure the tests and benchmarks below exercise csrc/cuda/spike_softmax.cu.
# spikekernels._C.with_cuda is set at build time, exactly when setup.py compiles csrc/cuda/.
timeout 60 python3 - <<'PY' || exit 1
import sys
import spikekernels  # noqa: F401
from spikekernels import _C
print("   spikekernels._C.with_cuda =", _C.with_cuda)
if not _C.with_cuda:
    sys.exit("the extension was built without its CUDA kernels")
PY

tests_rc=0
if [ "${TESTS:-tests}" = none ]; then
  echo "== GPU tests: skipped (TESTS=none)" | tee "$log"
else
  # several processes on the one GPU when pytest-xdist is there (from bench/.wheels): the
  # stage is mostly Triton compiles on the CPU, which a single process does one at a time
  workers=()
  if [ "${TEST_WORKERS:-8}" != 0 ] && python3 -c "import xdist" 2> /dev/null; then
    workers=(-n "${TEST_WORKERS:-8}")
  fi
  echo "== GPU tests (-k ${SELECT:-cuda}) ${workers[*]+${workers[*]}}"
  limit "$(left 200)" python3 -m pytest "${TESTS:-tests}" -k "${SELECT:-cuda}" -q \
    -p no:cacheprovider ${workers[@]+"${workers[@]}"} 2>&1 | tee "$log" | tail -25
  tests_rc=${PIPESTATUS[0]}
fi
save_out

echo "== benchmarks"
# One pytest run per suite, each with its own JSON, merged after each: a suite stopped by the
# deadline (SIGINT) still saves its finished cases; one killed 30 s later loses only itself.
parts=$(mktemp -d)
rm -f "$json"
bench_rc=0
merge_json() {
  ls "$parts"/*.json > /dev/null 2>&1 || return 0
  python3 - "$json" "$parts"/*.json <<'PY'
import json, sys
merged = None
for path in sys.argv[2:]:
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        print(f"   {path}: no results (cut short?)")
        continue
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
if merged is not None:
    with open(sys.argv[1], "w") as f:
        json.dump(merged, f, indent=2)
PY
}
# Nsight Compute on one block of the exact ViT-S, busy and settled (bench/kernel_profile.py):
# what bounds each fused kernel (roofline, occupancy, warp stalls). Best effort: skipped when
# the machine has no ncu or too little time is left, and never fails the check.
find_ncu() {
  local ncu="${NCU:-}"
  if [ -z "$ncu" ]; then
    ncu=$(command -v ncu || ls "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x)")/ncu" \
      /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  fi
  [ -n "$ncu" ] && [ -x "$ncu" ] && echo "$ncu"
  return 0
}
ncu_stage() {
  local ncu; ncu=$(find_ncu)
  if [ -z "$ncu" ]; then
    echo "   ncu: not on this machine, no kernel profile"
    return 0
  fi
  local budget; budget=$(left 60); budget=$(( budget < ${NCU_S:-150} ? budget : ${NCU_S:-150} ))
  if [ "$budget" -lt 60 ]; then
    echo "   ncu: skipped, out of time"
    return 0
  fi
  echo "   ncu (${ncu}, at most ${budget}s) -> ${ncu_report}"
  # our kernels only (not PyTorch's copies), a bounded count: ncu prints its report at exit
  timeout -k 10 "$budget" "$ncu" --profile-from-start off --target-processes all \
    --kernel-name "regex:(exact_|spike_|st_bif|step_tile|target_spikes|running_count|layer_norm_rows)" \
    --launch-count 40 --section SpeedOfLight --section LaunchStats --section Occupancy \
    --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 bench/kernel_profile.py > "$ncu_report" 2>&1
  local rc=$?
  echo "   ncu rc=${rc}; one line a profiled launch (the full report is the file):"
  ncu_summary < "$ncu_report"
}

# ncu's text report, one line a kernel launch: its name, then the first value of each metric
# below as it appears in the sections (unit included). L2 and issue say which bound a fused
# kernel meets: L2 bandwidth (re-read tiles) or instruction issue (the neuron's epilogue).
ncu_summary() {
  awk '
    BEGIN {
      n = split("Duration|Registers Per Thread|Achieved Occupancy|Compute (SM) Throughput|" \
                "Memory Throughput|L2 Cache Throughput|Issued Warp Per Scheduler", label, "|")
      split("time|regs|occupancy|sm|memory|l2|issue", short, "|")
    }
    function flush() { if (name != "") print "     " name line }
    /^  [A-Za-z_][A-Za-z0-9_]* \(/ { flush(); name = sprintf("%-32s", $1); line = ""; split("", seen); next }
    name == "" { next }
    {
      for (i = 1; i <= n; i++) {
        if (index($0, "    " label[i] " ") != 1 || seen[i]++) continue
        # a unitless metric has its value right after the label
        unit = NF > split(label[i], words, " ") + 1 ? $(NF - 1) : ""
        if (unit ~ /\//) unit = ""  # register/thread
        line = line "  " short[i] "=" $NF unit
      }
    }
    END { flush() }'
}

# Most telling first, in case the deadline cuts the last ones ("ncu": the stage above).
SUITES="bench/bench_neuron.py bench/bench_vit.py ncu bench/bench_host.py bench/bench_sesa.py bench/bench_softmax.py bench/bench_linear.py bench/bench_layernorm.py bench/bench_tiles.py"
for suite in ${BENCH:-$SUITES}; do
  if [ "$suite" = ncu ]; then
    ncu_stage
    save_out
    continue
  fi
  if [ $(( deadline - $(date +%s) )) -lt 45 ]; then
    echo "   ${suite}: skipped, out of time"
    bench_rc=1
    continue
  fi
  limit "$(suite_limit)" python3 -m pytest "$suite" -q -p no:cacheprovider \
    ${BENCH_K:+-k "$BENCH_K"} \
    --benchmark-json="${parts}/$(basename "$suite" .py).json" 2>&1 \
    | tee -a "$log" | sed -n '/spikekernels benchmarks on/,$p'
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then bench_rc=$rc; fi
  merge_json
  save_out
done

echo "== summary (${json})"
python3 - "$json" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no benchmark results: {exc}")
def shown(value):  # bools (bitwise_equal, settled) and ints (steps) as they are
    return str(value) if isinstance(value, int) else f"{value:.3g}"


print(f"{'benchmark':58s} {'us':>9s}  figures")
for b in data["benchmarks"]:
    info = b.get("extra_info", {})
    figs = ", ".join(f"{k}={shown(v)}" for k, v in info.items()
                     if isinstance(v, (bool, int, float)) and k != "seconds")
    us = info.get("seconds", b["stats"]["median"]) * 1e6
    print(f"{b['name'][:58]:58s} {us:9.1f}  {figs}")
    for name, error in info.get("baseline_error", {}).items():
        print(f"{'':58s} {'':9s}  baseline {name} did not run: {error[:200]}")
PY
echo "tests rc=${tests_rc} bench rc=${bench_rc}"
exit $(( tests_rc != 0 || bench_rc != 0 ))
