#!/usr/bin/env bash
# The GPU check of issue #16, for a machine with a CUDA GPU (about 8 minutes; nothing here runs in CI):
# installs the project with [cuda] (mamba-ssm; the run goes on without it if it cannot be built), runs the
# CUDA tests (GPU maps against CPU maps, the scan kernels) and the detector benchmark on the GPU, and
# writes benchmarks/results/gpu_check.json (or $OUT/gpu_check.json) with what ran and what it measured.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
python -m venv .venv-gpu >>"$log" 2>&1 || exit 1
. .venv-gpu/bin/activate
pip install -q -c configs/constraints.txt -e '.[test]' >>"$log" 2>&1 || { echo "install failed: see $log"; exit 1; }
mamba="not installed"
if timeout 240 pip install -q -c configs/constraints.txt -e '.[cuda]' >>"$log" 2>&1; then mamba="installed"; fi
python - <<'PY' >>"$log" 2>&1 || { echo "torch sees no CUDA device: see $log"; exit 1; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
timeout 180 python -m pytest -q tests/test_device.py tests/test_selective_scan.py tests/test_ss2d.py \
    -rs --junitxml="$out/gpu_tests.xml" >>"$log" 2>&1
tests_rc=$?
IUMAD_DEVICE=cuda timeout 240 python benchmarks/bench_detector.py --skip-single --synth-classes 1 \
    --out "$out/detector-gpu.json" >>"$log" 2>&1
bench_rc=$?
python - "$out" "$mamba" "$tests_rc" "$bench_rc" <<'PY'
import json, subprocess, sys, torch
out, mamba, tests_rc, bench_rc = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
report = {"benchmark": "gpu_check", "commit": commit, "gpu": torch.cuda.get_device_name(),
          "torch": torch.__version__, "mamba_ssm": mamba, "cuda_tests_exit_code": tests_rc,
          "detector_benchmark_exit_code": bench_rc}
try:
    report["detector"] = json.load(open(f"{out}/detector-gpu.json"))["cable_gland"]
except (OSError, KeyError, ValueError) as exc:
    report["detector"] = f"not measured ({exc})"
json.dump(report, open(f"{out}/gpu_check.json", "w"), indent=1)
print(json.dumps({k: v for k, v in report.items() if k != "detector"}))
PY
