"""A Ray Tune + Optuna + ASHA sweep with the tiny CPU space: restored (Tuner.restore) without
rerunning finished trials, results table and plot written, the best trial exported, and the
endpoint serving that export."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from hericap.config.loader import ConfigError

pytestmark = pytest.mark.ray

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


def test_sweep_resumes_exports_the_best_and_the_endpoint_serves_it(ray_cluster, tmp_path):
    from hericap.serve.server import start, stop
    from hericap.tune.sweep import load_space, run_sweep

    space = load_space(REPO / "tune_spaces" / "tiny_cpu.yaml")
    space.overrides.append(f"dataset.shard_dir={tmp_path / 'shards'}")
    first = run_sweep(space, "tiny", str(tmp_path))
    assert first["trials"] == 2
    experiment = tmp_path / "tiny" / "sweep"
    finished = {p.parent.name: p.read_text() for p in experiment.glob("*/result.json")}
    assert len(finished) == 2 and all('"done": true' in r for r in finished.values())

    # --resume restores the sweep (Tuner.restore): finished trials are not run again
    summary = run_sweep(space, "tiny", str(tmp_path), resume=True)
    assert summary["trials"] == 2 and summary["val_CIDEr"] == first["val_CIDEr"]
    for trial, results in finished.items():
        assert (experiment / trial / "result.json").read_text() == results
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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from hericap.serve.server import resolve_checkpoint

    url = start({"checkpoint": resolve_checkpoint(None, str(tmp_path / "tiny"))}, port=port)
    try:
        import io

        from skimage import data

        buf = io.BytesIO()
        Image.fromarray(data.astronaut()).save(buf, format="JPEG")
        r = requests.post(
            f"{url}/caption", data=buf.getvalue(), headers={"Content-Type": "image/jpeg"}
        )
        assert r.status_code == 200 and r.json()["caption"]
    finally:
        stop()
