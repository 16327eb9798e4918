"""Every benchmark runs at toy size and ends with its JSON line: a benchmark nobody runs rots.

Each ``benchmarks/bench_*.py`` has a ``main(argv)`` that prints its figures as one JSON object on
its last line and returns them; here each runs in-process with tiny arguments (the Ray ones on the
session's shared cluster) and its keys are checked; ``bench_gpu`` and ``bench_serve`` run inside
``gpu_check.sh``, whose dry run on the CPU is a subprocess. No timing is asserted: speed is
measured by running the benchmarks at full size, not by tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    """Run ``benchmarks/<name>.py``'s ``main(argv)``; its last printed line must be its result
    as JSON."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(argv)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(result))
    return result


def test_every_benchmark_has_a_smoke_test():
    """Every ``benchmarks/bench_*.py`` is run by a test (here, or beside the feature it
    measures, as ``bench_parity`` in test_research_import.py)."""
    tests = [p.read_text() for p in Path(__file__).parent.glob("test_*.py")]
    scripts = {p.stem for p in BENCHMARKS.glob("bench_*.py")}
    untested = {s for s in scripts if not any(f'"{s}' in text for text in tests)}
    assert not untested, f"benchmarks without a smoke test: {sorted(untested)}"


def test_bench_decode_runs_and_both_paths_agree(capsys):
    out = _run("bench_decode", ["--images", "2", "--beam", "2", "--words", "4"], capsys)
    assert out["same_captions"] is True
    assert out["cached_captions_per_s"] > 0 and out["recompute_captions_per_s"] > 0
    assert {"speedup", "caption_tokens", "preset"} <= set(out)


def test_bench_cider_runs_and_matches_the_toolkit(capsys):
    argv = ["--images", "4", "--per-image", "2", "--repeats", "1", "--block", "1"]
    out = _run("bench_cider", [*argv, "--corpus-images", "150"], capsys)
    assert out["max_abs_diff"] < 1e-9
    assert {"speedup", "speedup_cold", "speedup_token_ids", "corpus_images"} <= set(out)


def test_bench_scst_runs_every_baseline(capsys):
    argv = ["--batch-size", "4", "--steps", "1", "--warmup-xe-steps", "1", "--threads", "1"]
    out = _run("bench_scst", [*argv, "--images", "40"], capsys)
    assert out["xe_step_s"] > 0
    for baseline in ("beam_mean", "leave_one_out", "greedy"):
        assert out[f"scst_{baseline}_over_xe"] > 0


def test_bench_batching_runs_both_ways(capsys):
    argv = ["--repeats", "1", "--threads", "1", "--embed-dim", "8", "--beam", "2"]
    out = _run("bench_batching", [*argv, "--min-size", "96", "--max-size", "160"], capsys)
    assert 0 < out["padding_share"] < 1
    assert out["encode_by_size_over_padded_min"] > 0 and out["caption_by_size_over_padded_min"] > 0


@pytest.mark.ray
def test_bench_data_runs_the_three_paths(ray_cluster, capsys):
    argv = ["--images", "12", "--cores", "1", "--batch", "4", "--warmup", "4", "--files", "2"]
    out = _run("bench_data", argv, capsys)
    for key in ("ray_data_images_per_s", "pil_loop_images_per_s", "dataloader_images_per_s"):
        assert out[key] > 0
    assert {"ray_vs_dataloader", "first_batch_s", "ray_time"} <= set(out)


@pytest.mark.ray  # bench_serve.py starts its own local Ray cluster
def test_the_gpu_check_script_runs_end_to_end_as_a_cpu_dry_run():
    """``benchmarks/gpu_check.sh`` with ``GPU_CHECK_DEVICE=cpu`` at toy sizes: the tests marked
    ``gpu`` (they skip here, with the reason), ``"bench_gpu"``'s XE and SCST steps and
    ``"bench_serve"``'s batched and unbatched endpoints on the CPU; one JSON line with all three
    (each benchmark's own JSON inside). A GPU session has minutes, so the script must not be
    what fails there."""
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", PYTHON=sys.executable)
    env["SERVE_ARGS"] = (
        "--preset demo --requests 4 --rounds 1 --concurrency 2 --replica-gpus 0 --beam-size 1"
    )
    bench_gpu = ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "1"]
    bench_gpu += ["--overrides", "decode.max_len=6"]
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), *bench_gpu],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    tests = out["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == 0 and tests["skipped"] >= 1
    train = out["train"]
    assert train["device"] == "cpu" and train["gpu"] is None and train["image_size"] == [64, 64]
    for section in ("xe", "scst"):
        assert train[section]["steps_per_s"] > 0 and train[section]["batch_size"] == 2
        assert train[section]["peak_memory_gb"] is None  # measured on CUDA only
    serve = out["serve"]
    assert serve["exit_code"] == 0 and serve["device"] == "cpu" and serve["preset"] == "demo"
    assert serve["batched"]["errors"] == 0 and serve["unbatched"]["errors"] == 0
    assert serve["requests"] >= 2 and len(serve["round_ratios"]) == 1
    assert {"throughput_ratio", "p99_ratio", "model_only"} <= set(serve)
