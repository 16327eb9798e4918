#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU: under 8 minutes (its steps time out after
# 200 + 100 + 150 s, and report it):
#   1. the tests marked `gpu` (CUDA RNG in resume state, captioning on CUDA, batch-evaluation
#      actors and a Serve replica on the GPU, a GPU training run stopped and resumed);
#   2. benchmarks/bench_gpu.py at paper size: XE and SCST optimiser steps (bf16 autocast);
#   3. benchmarks/bench_serve.py with the paper model on the GPU: the endpoint with dynamic
#      batching vs batch 1, both replicas sharing the GPU;
# then prints one JSON line: the tests' outcome and both benchmarks' figures (steps/s,
# images/s, peak GPU memory, batch sizes, requests/s, latencies).
#
#   benchmarks/gpu_check.sh [bench_gpu.py options, e.g. --batch-size 32 --steps 10]
#   SERVE_ARGS="--requests 512" benchmarks/gpu_check.sh       # bench_serve.py options
#
# PYTHON picks the interpreter (default: .venv/bin/python, else python3). Exits non-zero when a
# test fails, no GPU is visible, or a benchmark fails; the JSON line is printed either way.
# GPU_CHECK_DEVICE=cpu is a dry run of the script itself on a machine without a GPU (the gpu
# tests then skip; give toy sizes: --preset tiny --batch-size 2 --steps 1, and SERVE_ARGS with
# --preset demo --requests 4 --rounds 1 --concurrency 2 --replica-gpus 0).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

device="${GPU_CHECK_DEVICE:-cuda}"
if [ "$device" = cuda ] &&
    ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo '{"error": "no CUDA GPU visible to torch"}'
    exit 2
fi

start=$(date +%s)
# tests that also need Java skip (with the reason) where it is missing
timeout 200 "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider \
    --junitxml="$work/gpu.xml" >"$work/pytest.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - start ))

start=$(date +%s)
timeout 100 "$PYTHON" benchmarks/bench_gpu.py --device "$device" "$@" >"$work/bench_gpu.log" 2>&1
gpu_rc=$?
gpu_s=$(( $(date +%s) - start ))

start=$(date +%s)
# shellcheck disable=SC2086  # SERVE_ARGS is a list of options
timeout 150 "$PYTHON" benchmarks/bench_serve.py --preset paper --replica-gpus 0.5 \
    --requests 128 --rounds 2 --concurrency 32 --beam-size 5 ${SERVE_ARGS:-} \
    >"$work/bench_serve.log" 2>&1
serve_rc=$?
serve_s=$(( $(date +%s) - start ))

"$PYTHON" - "$work" "$tests_rc" "$tests_s" "$gpu_rc" "$gpu_s" "$serve_rc" "$serve_s" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

work = Path(sys.argv[1])
tests_rc, tests_s, gpu_rc, gpu_s, serve_rc, serve_s = map(int, sys.argv[2:])
out = {"tests": {"exit_code": tests_rc, "seconds": tests_s}}
try:
    root = ET.parse(work / "gpu.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    out["tests"] |= {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}
    out["tests"]["failures"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
except (OSError, ET.ParseError, AttributeError, TypeError) as e:
    out["tests"]["error"] = f"no test report: {e}"
for key, log, rc, seconds in (
    ("train", "bench_gpu.log", gpu_rc, gpu_s),
    ("serve", "bench_serve.log", serve_rc, serve_s),
):
    lines = (work / log).read_text(errors="replace").strip().splitlines()
    try:
        out[key] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        out[key] = {"error": "\n".join(lines[-20:])}
    out[key] |= {"exit_code": rc, "seconds": seconds}
print(json.dumps(out))
sys.exit(1 if tests_rc or gpu_rc or serve_rc else 0)
PY
