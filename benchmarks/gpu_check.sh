#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU (under 8 minutes on one H200):
#   1. the tests marked `gpu` (CUDA RNG in resume state, captioning on CUDA, batch-evaluation
#      actors and a Serve replica on the GPU, a GPU training run stopped and resumed);
#   2. benchmarks/bench_gpu.py at paper size: XE and SCST optimiser steps (bf16 autocast) and the
#      Serve endpoint with one GPU replica;
# then prints one JSON line: the tests' outcome and the benchmark's figures (steps/s, images/s,
# peak GPU memory, batch sizes).
#
#   benchmarks/gpu_check.sh [--batch-size 32] [--steps 10] [other bench_gpu.py options]
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3). Exits non-zero when a
# test fails, no GPU is visible, or the benchmark fails; the JSON line is printed either way.
# GPU_CHECK_DEVICE=cpu is a dry run of the script itself on a machine without a GPU (the gpu
# tests then skip; give toy sizes: --preset tiny --batch-size 2 --steps 1 --requests 4).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

device="${GPU_CHECK_DEVICE:-cuda}"
if [ "$device" = cuda ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo '{"error": "no CUDA GPU visible to torch"}'
    exit 2
fi

start=$(date +%s)
# the java marker is not required: tests needing Java skip (with the reason) without it
timeout 300 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider \
    --junitxml="$work/gpu.xml" >"$work/pytest.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 360 "$PYTHON" benchmarks/bench_gpu.py --device "$device" "$@" >"$work/bench.log" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - start ))

"$PYTHON" - "$work" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" <<'EOF'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work, tests_rc, tests_s, bench_rc, bench_s = sys.argv[1:]
out = {"tests": {"exit_code": int(tests_rc), "seconds": int(tests_s)}}
try:
    suite = ET.parse(Path(work) / "gpu.xml").getroot().find("testsuite")
    total, failed = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
    skipped = int(suite.get("skipped"))
    out["tests"] |= {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}
    out["tests"]["failures"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
except (OSError, ET.ParseError, AttributeError) as e:
    out["tests"]["error"] = f"no test report: {e}"
lines = (Path(work) / "bench.log").read_text(errors="replace").strip().splitlines()
try:
    out["bench"] = json.loads(lines[-1])
except (IndexError, json.JSONDecodeError):
    out["bench"] = {"error": "\n".join(lines[-20:])}
out["bench_exit_code"], out["bench_seconds"] = int(bench_rc), int(bench_s)
print(json.dumps(out))
sys.exit(1 if int(tests_rc) or int(bench_rc) else 0)
EOF
