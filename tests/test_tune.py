"""A Ray Tune + Optuna + ASHA sweep with the tiny CPU space: Ctrl-C'd mid-way, then restored
(Tuner.restore) without rerunning the finished trial; results table and plot written, the best
trial exported, and the endpoint serving that export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from helpers import free_port, jpeg
from PIL import Image
from skimage import data

from hericap.config.loader import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def test_space_files_are_checked_before_anything_runs(tmp_path):
    from hericap.tune.sweep import load_space

    for shipped in sorted((REPO / "tune_spaces").glob("*.yaml")):
        space = load_space(shipped)
        assert space.params and space.num_samples >= 2, shipped
    decoders = yaml.safe_load((REPO / "tune_spaces" / "decoders.yaml").read_text())
    assert set(decoders["params"]["model.cap_generator.decoder_name"]["choice"]) == {
        "Parallel",
        "Sequential",
        "Concatenated_Parallel",
        "Concatenated_Sequential",
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: demo\nparams:\n  optimizer.xe_lrr: {loguniform: [1.0e-4, 1.0e-3]}\n")
    with pytest.raises(ConfigError, match="xe_lr"):
        load_space(bad)
    bad.write_text("preset: demo\nparams:\n  optimizer.xe_lr: {normal: [0, 1]}\n")
    with pytest.raises(ConfigError, match="sampler"):
        load_space(bad)


def _finished_trials(experiment: Path) -> dict[str, str]:
    """Trial folder name -> result.json text, for the trials whose last result says done."""
    out = {}
    for path in experiment.glob("*/result.json"):
        text = path.read_text()
        if '"done": true' in text:
            out[path.parent.name] = text
    return out


def test_an_interrupted_sweep_resumes_exports_the_best_and_the_endpoint_serves_it(
    ray_cluster, tmp_path
):
    from hericap.serve.server import resolve_checkpoint, start, stop
    from hericap.tune.sweep import load_space, run_sweep

    space_file = REPO / "tune_spaces" / "tiny_cpu.yaml"
    shards = f"dataset.shard_dir={tmp_path / 'shards'}"
    experiment = tmp_path / "tiny" / "sweep"
    log_path = tmp_path / "tune.log"
    # `hericap tune` in its own process on the session's cluster, Ctrl-C'd (SIGINT) as soon as
    # its first trial has finished, while the second one runs
    cmd = [sys.executable, "-m", "hericap.cli", "tune", "--space", str(space_file), shards]
    cmd += ["--name", "tiny", "--output-dir", str(tmp_path)]
    cmd += ["--ray-address", ray_cluster.get_runtime_context().gcs_address]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 420
        while not _finished_trials(experiment) and proc.poll() is None:
            assert time.monotonic() < deadline, "no trial finished in 7 minutes"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert code == 130, log[-3000:]
    assert "1 of 2 trials unfinished" in log and "--resume" in log, log[-3000:]
    assert not (tmp_path / "tiny" / "best").exists()  # no partial "best" exported
    finished = _finished_trials(experiment)
    assert len(finished) == 1

    # --resume restores the sweep (Tuner.restore): the finished trial is not run again, the
    # interrupted one is completed
    space = load_space(space_file, [shards])
    summary = run_sweep(space, "tiny", str(tmp_path), resume=True)
    assert summary["trials"] == 2
    for trial, results in finished.items():
        assert (experiment / trial / "result.json").read_text() == results
    assert len(_finished_trials(experiment)) == 2
    rows = (tmp_path / "tiny" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "best_val_CIDEr" in rows[0] and "decoder_name" in rows[0]
    with Image.open(tmp_path / "tiny" / "trials.png") as png:
        assert png.format == "PNG"

    best = tmp_path / "tiny" / "best"
    trial = json.loads((best / "trial.json").read_text())
    saved = json.loads((best / "config.json").read_text())
    assert (
        saved["model"]["cap_generator"]["decoder_name"]
        == trial["params"]["model.cap_generator.decoder_name"]
    )
    assert saved["optimizer"]["xe_lr"] == pytest.approx(trial["params"]["optimizer.xe_lr"])

    checkpoint = resolve_checkpoint(None, str(tmp_path / "tiny"))
    url = start({"checkpoint": checkpoint}, port=free_port())
    try:
        r = requests.post(
            f"{url}/caption", data=jpeg(data.astronaut()), headers={"Content-Type": "image/jpeg"}
        )
        assert r.status_code == 200 and r.json()["caption"]
    finally:
        stop()
