#!/usr/bin/env bash
# GPU check, run on a lent GPU machine (no network there): builds the CUDA extension with that
# machine's own python3/torch/triton, runs the `cuda` tests and the benchmarks at paper sizes,
# writes bench/results/<gpu>-<date>.json and prints a short table last. Budget: < 8 minutes.
#
#   bash bench/device_check.sh            # everything
#   BENCH=bench/bench_neuron.py bash bench/device_check.sh   # one suite
#
# SpikingJelly (a baseline) is installed from bench/.wheels/ when that ignored folder holds its
# wheel (`make wheels`, then carry bench/.wheels to the machine); without it the SpikingJelly
# ratios are left out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU here'" || exit 1
gpu=$(python3 -c "import torch, re; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
day=$(date +%Y-%m-%d)
mkdir -p bench/results
json="bench/results/${gpu}-${day}.json"
log="bench/results/${gpu}-${day}.log"

echo "== build (CUDA extension) on ${gpu}"
start=$(date +%s)
SPIKEKERNELS_CUDA=1 MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -5
echo "   build took $(( $(date +%s) - start ))s"
if [ -d bench/.wheels ]; then
  python3 -m pip install -q --no-deps --no-index --find-links bench/.wheels spikingjelly loguru 2>&1 | tail -2
fi
python3 -m spikekernels.info

echo "== cuda tests"
timeout 180 python3 -m pytest tests -m cuda -q -p no:cacheprovider 2>&1 | tee "$log" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== benchmarks"
timeout 300 python3 -m pytest "${BENCH:-bench}" -q -p no:cacheprovider \
  --benchmark-json="$json" --benchmark-min-rounds=5 2>&1 | tee -a "$log" \
  | sed -n '/spikekernels benchmarks on/,$p'
bench_rc=${PIPESTATUS[0]}

echo "== summary (${json})"
python3 - "$json" <<'PY'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"no benchmark results: {exc}")
keys = ("gbps", "fraction_of_copy_bandwidth", "speedup_vs_per_step_reference",
        "speedup_vs_spikingjelly", "speedup_vs_dense", "ratio_to_int8_dense")
print(f"{'benchmark':58s} {'us':>9s}  figures")
for b in data["benchmarks"]:
    info = b.get("extra_info", {})
    figs = ", ".join(f"{k}={v:.3g}" for k, v in info.items()
                     if isinstance(v, float) and k != "seconds")
    us = info.get("seconds", b["stats"]["median"]) * 1e6
    print(f"{b['name'][:58]:58s} {us:9.1f}  {figs}")
PY
echo "tests rc=${tests_rc} bench rc=${bench_rc}"
exit $(( tests_rc != 0 || bench_rc != 0 ))
