"""Config: presets, the seed's dotted overrides, and errors that name the valid keys."""

from __future__ import annotations

import pytest

from hericap.config import ConfigError, load_config
from hericap.config.loader import from_dict, list_presets, to_dict, valid_keys

SEED_TRAIN = [
    "exp.name=caption_finetune_region",
    "model.detector.checkpoint=/ckpt/region_ckpt.pth",
    "optimizer.finetune_xe_epochs=10",
    "optimizer.finetune_sc_epochs=10",
    "optimizer.batch_size=32",
    "optimizer.num_workers=4",
    "exp.ngpus_per_node=8",
    "exp.world_size=8",
    "model.cap_generator.decoder_name=Parallel",
    "dataset.overfit=False",
]


def test_presets_shipped():
    assert {"demo", "coco"} <= set(list_presets())


def test_seed_train_command_parses():
    cfg = load_config(SEED_TRAIN)
    assert cfg.exp.name == "caption_finetune_region"
    assert cfg.model.detector.checkpoint == "/ckpt/region_ckpt.pth"
    assert cfg.optimizer.finetune_xe_epochs == 10
    assert cfg.optimizer.finetune_sc_epochs == 10
    assert cfg.optimizer.batch_size == 32
    assert cfg.optimizer.num_workers == 4
    assert (cfg.exp.ngpus_per_node, cfg.exp.world_size) == (8, 8)
    assert cfg.model.cap_generator.decoder_name == "Parallel"
    assert cfg.dataset.overfit is False


def test_seed_eval_command_parses_quoted_split():
    # The shell passes split='test' through as split=test; a literal quote must work too.
    for arg in ("split=test", "split='test'"):
        cfg = load_config([arg, "exp.checkpoint=/runs/best"])
        assert cfg.split == "test"
        assert cfg.exp.checkpoint == "/runs/best"


def test_preset_selection_and_override_order():
    demo = load_config(preset="demo")
    assert demo.preset == "demo" and demo.exp.world_size == 2 and demo.model.d_model == 128
    cfg = load_config(["preset=demo", "model.d_model=64", "model.n_heads=2"])
    assert cfg.preset == "demo" and cfg.model.d_model == 64
    coco = load_config(preset="coco")
    assert coco.model.extractor.depths == [2, 2, 18, 2] and coco.model.detector.num_queries == 150


def test_typo_names_nearest_keys():
    with pytest.raises(ConfigError) as e:
        load_config(["optimizer.batch_sise=8"])
    msg = str(e.value)
    assert "optimizer.batch_sise" in msg and "optimizer.batch_size" in msg


def test_unknown_group_key_lists_group():
    with pytest.raises(ConfigError) as e:
        load_config(["model.cap_generator.decoder=Parallel"])
    assert "model.cap_generator.decoder_name" in str(e.value)


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError) as e:
        load_config(["optimizer.batch_size=many"])
    assert "optimizer.batch_size" in str(e.value)
    assert "int" in str(e.value)


def test_setting_a_group_is_an_error():
    with pytest.raises(ConfigError, match="is a group"):
        load_config(["optimizer=3"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="demo"):
        load_config(["preset=tiny_typo"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(["model.d_model=100", "model.n_heads=8"])
    with pytest.raises(ConfigError, match="split"):
        load_config(["split=holdout"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["optimizer.batch_size"])


def test_round_trip_through_dict():
    cfg = load_config(["preset=demo", "exp.name=x"])
    assert from_dict(to_dict(cfg)) == cfg


def test_every_leaf_key_is_listed():
    keys = valid_keys()
    for key in (
        "exp.world_size",
        "dataset.overfit",
        "model.detector.checkpoint",
        "model.cap_generator.decoder_name",
        "optimizer.finetune_sc_epochs",
        "split",
    ):
        assert key in keys


def test_data_root_env_is_used(monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/mnt/datasets")
    assert load_config().dataset.root == "/mnt/datasets"
    monkeypatch.delenv("DATA_ROOT")
    assert load_config().dataset.root == "data"


def test_research_keys_spelled_differently_say_where_they_went():
    with pytest.raises(ConfigError, match=r"decode\.test_beam_size"):
        load_config(["model.beam_size=3"])


def test_seed_num_workers_drives_decode_concurrency_unless_set():
    from hericap.training.driver import decode_concurrency

    assert decode_concurrency(load_config(["preset=demo", "optimizer.num_workers=4"])) == 4
    assert (
        decode_concurrency(
            load_config(["preset=demo", "optimizer.num_workers=4", "dataset.decode_concurrency=2"])
        )
        == 2
    )
    assert decode_concurrency(load_config(["preset=demo", "optimizer.num_workers=0"])) is None


def test_missing_detector_checkpoint_is_an_error_naming_the_key():
    from hericap.models import build_captioner

    cfg = load_config(["preset=demo", "model.detector.checkpoint=/w/region_ckpt.pth"])
    with pytest.raises(FileNotFoundError, match=r"model\.detector\.checkpoint"):
        build_captioner(cfg.model, 20, 64)


def test_region_levels_beyond_the_extractor_maps_are_refused():
    with pytest.raises(ConfigError, match="num_levels"):
        load_config(["preset=tiny", "model.detector.num_levels=4"])


def test_presets_extend_their_base():
    paper, coco = load_config(["preset=paper"]), load_config(["preset=coco"])
    assert paper.preset == "paper" and paper.model == coco.model
    tiny = load_config(["preset=tiny"])
    assert tiny.model.use_reg_feat and tiny.model.use_glob_feat
    assert (
        tiny.optimizer.captions_per_image
        == load_config(["preset=demo"]).optimizer.captions_per_image
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # registry names: found here, not inside the Ray workers after the cluster started
        (["model.cap_generator.decoder_name=Paralel"], r"decoder_name='Paralel'.*Parallel"),
        (["model.grid_layer_type=routng"], r"grid_layer_type='routng'.*routing"),
        (["model.extractor.stem=cnv"], r"stem='cnv'.*conv"),
        (["model.cap_generator.activation=gelu2"], r"activation='gelu2'"),
        (["dataset.name=cocoo"], r"dataset.name='cocoo'.*coco_captions"),
        # ranges, shapes and divisibility
        (["model.frozen_stages=3"], r"frozen_stages=3 must be in \[-1, 2\]"),
        (["model.extractor.num_heads=[3,4]"], r"32 channels.*num_heads=3"),
        (["dataset.image_size=68"], r"image_size.*68.*stride 8"),
        (["model.dropout=1.5"], r"model.dropout=1.5 must be in \[0, 1\)"),
        (["optimizer.beta_2=1.0"], r"beta_2=1.0 must be in \[0, 1\)"),
        (["exp.seed=-1"], r"exp.seed=-1"),
        (["exp.max_failures=-2"], r"max_failures=-2 must be >= -1"),
        (["optimizer.finetune_xe_epochs=0", "optimizer.finetune_sc_epochs=0"], "no training"),
        (["exp.resume=True", "exp.overwrite=True"], "set one of them"),
        # locations: a URI that lost its slashes (what Path does to s3://) is not a folder
        (["dataset.shard_dir=s3:/bucket/coco"], r"s3://bucket/coco"),
        (["exp.name=a/b"], "plain folder name"),
        # tracking: a mode that exists, and MLflow's local store in a folder
        (["exp.tracking=mlfow"], r"exp.tracking='mlfow'.*mlflow"),
        (["exp.tracking=both", "exp.output_dir=s3://b/o"], r"set \$MLFLOW_TRACKING_URI"),
    ],
)
def test_every_value_is_checked_before_anything_starts(overrides, message, monkeypatch):
    from hericap.runtime.preflight import check_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=message):
        check_config(load_config(["preset=demo", *overrides], validate=False))


def test_preflight_passes_every_shipped_preset_and_weight_files_must_exist(tmp_path):
    from hericap.runtime.preflight import check_config

    for preset in list_presets():
        check_config(load_config([f"preset={preset}"]))
    missing = load_config(["preset=demo", f"model.extractor.checkpoint={tmp_path}/swin.pth"])
    with pytest.raises(FileNotFoundError, match=r"model\.extractor\.checkpoint=.*swin\.pth"):
        check_config(missing)
    check_config(missing, need_weights=False)  # a checkpoint's own config never reads them


def test_the_cli_refuses_a_bad_config_and_a_previous_run_before_ray_starts(
    tmp_path, monkeypatch, capsys
):
    """A typo fails at once (not after the cluster, the data and max_failures worker restarts);
    a run whose outputs exist is an error naming exp.resume and exp.overwrite, and nothing of it
    is deleted."""
    import hericap.runtime.cluster as cluster
    from hericap.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    base = ["train", "preset=demo", f"exp.output_dir={tmp_path}", "exp.name=x"]
    assert main([*base, "model.cap_generator.decoder_name=Paralel"]) == 2
    assert "Paralel" in capsys.readouterr().err
    previous = tmp_path / "x" / "runs" / "best" / "meta.json"
    previous.parent.mkdir(parents=True)
    previous.write_text('{"val_CIDEr": 1.0}')
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "exp.resume=True" in err and "exp.overwrite=True" in err and str(previous.parent) in err
    assert previous.read_text() == '{"val_CIDEr": 1.0}'


def test_the_configuration_reference_is_current_and_describes_every_key():
    """docs/configuration.md is generated from the schema; regenerate it with
    `python -m hericap.config.reference > docs/configuration.md` after changing a key."""
    from pathlib import Path

    from hericap.config.loader import valid_keys
    from hericap.config.reference import reference_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert page == reference_markdown(), "docs/configuration.md is stale: regenerate it"
    for key in valid_keys():
        (row,) = [line for line in page.splitlines() if line.startswith(f"| `{key}` |")]
        assert row.rstrip(" |").rsplit("|", 1)[-1].strip(), f"{key} has no description"


def test_overrides_may_follow_options_and_anything_else_is_refused(capsys):
    """argparse alone refuses positionals split by an option; the CLI takes ``key=value`` words
    anywhere after the command, and still refuses unknown options and stray words."""
    from hericap.cli import parse_args

    args = parse_args(["tune", "--space", "s.yaml", "a.b=1", "--output-dir", "o", "exp.x=2"])
    assert args.overrides == ["a.b=1", "exp.x=2"] and args.output_dir == "o"
    args = parse_args(["train", "preset=demo", "--no-test", "exp.name=x"])
    assert args.overrides == ["preset=demo", "exp.name=x"] and args.no_test
    split = ["tune", "--space", "s.yaml", "a.b=1", "--output-dir", "o"]
    for argv in (["train", "--bogus"], [*split, "stray"], [*split, "--bogus=1"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(argv)
        assert exit_.value.code == 2 and argv[-1] in capsys.readouterr().err
