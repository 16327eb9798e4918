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
