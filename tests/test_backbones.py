"""Pretrained Swin weights for the extractor (``model.extractor.checkpoint``) in every layout users
bring: timm's state dict, Microsoft's release layout, .safetensors, s3://, and the research
code's backbone (whose windows the research flavours reproduce)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from hericap.config import load_config
from hericap.data.transforms import resize_spec
from hericap.models.builder import build_captioner
from hericap.models.encoders import SwinExtractor

# the tiny preset's Swin: two stages, window 4, 64x64 images, extra stride-2 stage of 64
TINY = {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: steadier on a shared 2-core machine, and what the oracle used."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _timm_swin(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, num_classes=10, **TINY
    ).eval()


def _tiny_model(checkpoint: str):
    cfg = load_config(["preset=tiny", f"model.extractor.checkpoint={checkpoint}"])
    return build_captioner(cfg.model, 20, resize_spec(cfg.dataset).model_size).eval()


def _assert_same_features(model, swin: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.extractor(x)
        ref = swin.forward_intermediates(x, intermediates_only=True)  # NCHW
    ref = [r.permute(0, 2, 3, 1) for r in ref]
    assert len(ref) == 2 and all(torch.equal(a, b) for a, b in zip(ours[:2], ref, strict=True))


def _microsoft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's keys in Microsoft's release layout: patch merging at the end of the previous
    stage, ``head.*``, and the derived buffers the original code saves."""
    out = {}
    for key, value in state.items():
        if m := re.match(r"layers\.(\d+)\.downsample\.(.*)", key):
            key = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
        out[key.replace("head.fc.", "head.")] = value
    for key in [k for k in out if k.endswith("relative_position_bias_table")]:
        block = key.removesuffix("attn.relative_position_bias_table")
        out[f"{block}attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
        out[f"{block}attn_mask"] = torch.zeros(4, 16, 16)
    return out


@pytest.mark.parametrize("layout", ["timm", "microsoft", "safetensors"])
def test_pretrained_swin_loads_in_each_layout_and_gives_timms_features(layout, tmp_path):
    swin = _timm_swin()
    state = swin.state_dict()
    assert any(k.startswith("head.") for k in state) and "norm.weight" in state
    if layout == "timm":
        path = tmp_path / "swin.pth"
        torch.save(state, path)
    elif layout == "microsoft":
        path = tmp_path / "swin_ms.pth"
        torch.save({"model": _microsoft(state)}, path)
    else:
        path = tmp_path / "swin.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = _tiny_model(str(path))
    _assert_same_features(model, swin)
    report = model.extractor.load_report
    assert report.fresh == ["extra.norm.bias", "extra.norm.weight", "extra.reduction.weight"]
    reasons = set(report.ignored.values())
    assert "classification head (the extractor has none)" in reasons
    assert "final norm of the classifier (not a feature map's)" in reasons
    if layout == "microsoft":
        assert "derived buffer, rebuilt by timm" in reasons
    assert len(report.loaded) == len(
        [k for k in model.extractor.state_dict() if k.startswith("body.")]
    )


def test_pretrained_swin_loads_from_s3(moto_server, tmp_path):
    import boto3

    swin = _timm_swin(seed=1)
    path = tmp_path / "swin.pth"
    torch.save(swin.state_dict(), path)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="weights")
    s3.upload_file(str(path), "weights", "swin/tiny.pth")
    _assert_same_features(_tiny_model("s3://weights/swin/tiny.pth"), swin)


def test_a_wrong_shape_or_missing_weight_is_an_error_that_names_it(tmp_path):
    other = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, embed_dim=16,
        depths=(1, 1), num_heads=(1, 2), window_size=8,
    )  # fmt: skip
    path = tmp_path / "window8.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(RuntimeError, match="relative_position_bias_table"):
        _tiny_model(str(path))
    state = _timm_swin().state_dict()
    del state["layers.1.blocks.0.mlp.fc1.weight"]
    state["layers.1.blocks.0.mlp.surprise"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(RuntimeError) as e:
        _tiny_model(str(path))
    assert "body.layers_1.blocks.0.mlp.fc1.weight" in str(e.value)
    assert "layers.1.blocks.0.mlp.surprise" in str(e.value)


@pytest.mark.realdata
def test_the_research_backbone_gives_the_research_features_only_with_research_windows(realdata):
    oracle = realdata / "research_checkpoints"
    path = oracle / "grit_parallel" / "checkpoint.pth"
    inputs = torch.load(oracle / "inputs.pt", weights_only=True)
    # the 384x256 photo alone: its 64-wide and narrower maps are no whole number of windows
    h, w = inputs["resized_hw"][1].tolist()
    image = inputs["batch"][1:2, :, :h, :w]
    ref = torch.load(oracle / "grit_parallel" / "outputs.pt", weights_only=True)
    ref = ref["single1.det.gri_feat"]
    sizes = {"embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 12}
    diffs = {}
    for rule in ("research", "timm"):
        extractor = SwinExtractor(
            image_size=(384, 640), extra_stage_dim=64, window_rule=rule, checkpoint=str(path),
            **sizes,
        ).eval()  # fmt: skip
        with torch.no_grad():
            last = extractor(image)[-1].flatten(1, 2)
        diffs[rule] = float((last - ref).abs().max())
    report = extractor.load_report
    assert not report.fresh  # the research backbone carries the extra stride-64 stage
    assert "not part of the backbone (the checkpoint's other modules)" in report.ignored.values()
    assert diffs["research"] < 1e-5  # the oracle's float32 noise is 1.6e-6
    assert diffs["timm"] > 1e-2  # timm's own window rule gives other features


def test_research_frozen_stages_count_like_the_research_code():
    frozen = {}
    for rule in ("timm", "research"):
        ext = SwinExtractor(
            image_size=64, extra_stage_dim=64, frozen_stages=2, frozen_stages_rule=rule, **TINY
        )
        frozen[rule] = {n for n, p in ext.named_parameters() if not p.requires_grad}
    research = frozen["research"]
    # research frozen_stages=2: the patch embedding and stage 0 with the merging that ends it
    # (timm keeps that merging at the start of stage 1); stage 1's blocks stay trainable
    assert any(n.startswith("body.patch_embed.") for n in research)
    assert any(n.startswith("body.layers_0.blocks.") for n in research)
    assert any(n.startswith("body.layers_1.downsample.") for n in research)
    assert not any(n.startswith("body.layers_1.blocks.") for n in research)
    assert any(n.startswith("body.layers_1.blocks.") for n in frozen["timm"])


def test_backbone_file_path_is_checked(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        _tiny_model(str(tmp_path / "nope.pth"))
