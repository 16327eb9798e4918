"""Sweep spaces are checked before anything runs: every value a trial can draw, and a previous
sweep is never replaced by default. (The sweep itself, Ctrl-C'd, resumed, exported and served,
runs on the multi-node cluster with S3 in test_multinode.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hericap.config.loader import ConfigError

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
    bad.write_text("preset: demo\nparams:\n  optimizer.xe_lr: {loguniform: [1.0e-3, 1.0e-4]}\n")
    with pytest.raises(ConfigError, match="empty or invalid"):
        load_space(bad)


@pytest.mark.parametrize(
    ("param", "message"),
    [
        # the second choice is a typo: only the first was checked before
        (
            "model.cap_generator.decoder_name: {choice: [Parallel, Paralel]}",
            r"decoder_name=Paralel.*Parallel",
        ),
        ("model.grid_layer_type: {choice: [transformer, routng]}", "routng"),
        ("model.extractor.stem: {choice: [patch, cnv]}", "cnv"),
        # the top of a range: 3 heads do not divide d_model 32
        ("model.n_heads: {randint: [1, 4]}", r"n_heads=3.*divisible"),
        ("model.frozen_stages: {randint: [-1, 4]}", r"frozen_stages=3 must be in \[-1, 2\]"),
        ("model.dropout: {uniform: [0.0, 1.0]}", r"dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_every_choice_and_both_ends_of_every_range_are_checked(tmp_path, param, message):
    from hericap.tune.sweep import load_space

    space = tmp_path / "space.yaml"
    space.write_text(
        "preset: demo\noverrides: [model.d_model=32, model.n_heads=2]\nparams:\n  " + param + "\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_space(space)


def test_a_previous_sweep_is_an_error_naming_resume_and_overwrite(tmp_path, monkeypatch, capsys):
    """Nothing of the previous sweep is deleted, and Ray never starts."""
    import hericap.runtime.cluster as cluster
    from hericap.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    previous = tmp_path / "tiny_cpu" / "sweep" / "experiment_state.json"
    previous.parent.mkdir(parents=True)
    previous.write_text("{}")
    space = str(REPO / "tune_spaces" / "tiny_cpu.yaml")
    assert main(["tune", "--space", space, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert previous.read_text() == "{}"
    assert (
        main(["tune", "--space", space, "--output-dir", str(tmp_path), "--resume", "--overwrite"])
        == 2
    )
    # MLflow's local store (exp.tracking=mlflow, no $MLFLOW_TRACKING_URI) cannot live in S3
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s3 = ["--output-dir", "s3://bucket/sweeps", "exp.tracking=mlflow"]
    assert main(["tune", "--space", space, *s3]) == 2
    assert "set $MLFLOW_TRACKING_URI" in capsys.readouterr().err
