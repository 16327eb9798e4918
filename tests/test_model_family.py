"""The full model family: extractor with the extra stage, region (Deformable DETR), global and
routing encoders, every fusion variant with every branch toggle, GRIT detector checkpoints,
explanations and decoding over images of different sizes."""

from __future__ import annotations

import itertools
import logging

import pytest
import timm
import torch

from hericap.config import load_config
from hericap.models import FUSION_REGISTRY, build_captioner
from hericap.models.builder import format_parameter_summary, parameter_summary
from hericap.models.decoding import greedy_decode, sample_decode
from hericap.models.encoders import SwinExtractor
from hericap.models.global_encoder import GlobalEncoder, RelationAwareGlobalLayer
from hericap.models.grit_checkpoint import load_detector_checkpoint
from hericap.models.region import RegionEncoder, ms_deform_attn
from hericap.models.routing import RoutingLayer

VOCAB = 30
TOGGLES = [c for c in itertools.product([True, False], repeat=3) if any(c)]


def _tiny(*overrides: str, seed: int = 0):
    cfg = load_config(["preset=tiny", *overrides])
    torch.manual_seed(seed)
    return build_captioner(cfg.model, VOCAB, image_size=64), cfg


def _tokens(n: int, t: int = 6) -> torch.Tensor:
    x = torch.randint(4, VOCAB, (n, t))
    x[:, 0] = 2
    return x


@pytest.mark.parametrize("variant", list(FUSION_REGISTRY))
@pytest.mark.parametrize("grid,region,glob", TOGGLES)
def test_every_variant_and_branch_toggle_trains_every_trainable_parameter(
    variant, grid, region, glob
):
    model, _ = _tiny(
        f"model.cap_generator.decoder_name={variant}",
        f"model.use_gri_feat={grid}",
        f"model.use_reg_feat={region}",
        f"model.use_glob_feat={glob}",
    )
    assert model.memory_names == [
        n for n, on in (("grid", grid), ("region", region), ("global", glob)) if on
    ]
    log_probs = model(torch.randn(2, 3, 64, 64), _tokens(4), captions_per_image=2)
    log_probs.mean().backward()
    silent = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert silent == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # only the detector-only heads are frozen: the caption loss cannot reach them
    assert all(
        n.startswith(
            (
                "region_encoder.class_embed",
                "region_encoder.bbox_embed",
                "region_encoder.reference_points",
            )
        )
        for n in frozen
    )
    assert bool(frozen) == region


def test_extractor_extra_stage_reaches_stride_64_on_non_square_images():
    ext = SwinExtractor(
        image_size=(384, 640),
        patch_size=4,
        embed_dim=8,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        window_size=12,
        extra_stage_dim=24,
    )
    assert ext.reductions == [4, 8, 16, 32, 64] and ext.channels == [8, 16, 32, 64, 24]
    maps = ext(torch.randn(1, 3, 384, 640))
    assert maps[-1].shape == (1, 6, 10, 24)  # the paper's 60 tokens
    assert ext(torch.randn(1, 3, 256, 192))[-1].shape == (1, 4, 3, 24)


def test_paper_preset_builds_on_cpu_with_swin_b_and_the_papers_branch_sizes():
    cfg = load_config(["preset=paper"])
    model = build_captioner(cfg.model, 10_000, image_size=(384, 640))
    counts = parameter_summary(model)
    reference = timm.create_model(
        "swin_base_patch4_window12_384", pretrained=False, features_only=True
    )
    extra = 4 * 1024 * 1024 + 2 * 4 * 1024  # merging 4C -> 1024, LayerNorm(4C)
    assert counts["extractor"] == sum(p.numel() for p in reference.parameters()) + extra
    assert set(counts) >= {"grid_encoder", "region_encoder", "global_encoder", "decoder"}
    region = model.region_encoder
    assert len(region.decoder_layers) == 6 and region.query_embed.num_embeddings == 150
    attn = region.decoder_layers[0].cross_attn
    assert (attn.n_levels, attn.n_points, attn.n_heads) == (4, 4, 8)
    assert len(model.grid_encoder.layers) == 3 and len(model.global_encoder.layers) == 3
    assert len(model.decoder.layers) == 3
    table = format_parameter_summary(model)
    assert "region sub-encoder" in table and "global sub-encoder" in table


def test_deformable_attention_samples_exact_pixels_at_their_centres():
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    value = torch.randn(1, 4 * 6 + 2 * 3, 2, 5)  # [B, S, heads, head_dim]
    # one query; head 0 looks at pixel (1, 2) of level 0 and (0, 2) of level 1, weights 0.25/0.75
    loc = torch.zeros(1, 1, 2, 2, 1, 2)
    loc[0, 0, :, 0, 0] = torch.tensor([(2 + 0.5) / 6, (1 + 0.5) / 4])
    loc[0, 0, :, 1, 0] = torch.tensor([(2 + 0.5) / 3, (0 + 0.5) / 2])
    weights = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2, 1).expand(1, 1, 2, 2, 1)
    out = ms_deform_attn(value, shapes, loc, weights).view(1, 1, 2, 5)
    expected = 0.25 * value[0, 1 * 6 + 2] + 0.75 * value[0, 24 + 0 * 3 + 2]
    assert torch.allclose(out[0, 0], expected, atol=1e-6)


def test_region_encoder_gives_features_boxes_and_logits_for_any_map_sizes():
    enc = RegionEncoder(
        in_channels=[8, 16],
        d_model=32,
        n_heads=2,
        d_ff=64,
        n_layers=2,
        n_levels=2,
        n_points=2,
        n_queries=5,
        n_classes=7,
    )
    for h, w in [(8, 8), (6, 10)]:
        maps = [torch.randn(2, h, w, 8), torch.randn(2, h // 2, w // 2, 16)]
        out = enc(maps, return_logits=True)
        assert out.features.shape == (2, 5, 32) and out.boxes.shape == (2, 5, 4)
        assert out.class_logits.shape == (2, 5, 7)
        assert ((out.boxes > 0) & (out.boxes < 1)).all()


def test_global_layer_is_permutation_equivariant_and_size_free():
    torch.manual_seed(0)
    layer = RelationAwareGlobalLayer(d_model=16, d_ff=32, dropout=0.0).eval()
    x = torch.randn(2, 7, 16)
    perm = torch.randperm(7)
    assert torch.allclose(layer(x)[:, perm], layer(x[:, perm]), atol=1e-5)
    gates = layer.position_gates(x)
    assert gates.shape == (2, 7, 1) and ((gates > 0) & (gates < 1)).all()
    assert gates.std() > 0  # positions are weighted differently
    enc = GlobalEncoder(in_dim=8, d_model=16, n_layers=2, d_ff=32).eval()
    assert enc(torch.randn(1, 6, 10, 8)).shape == (1, 60, 16)
    assert enc(torch.randn(1, 3, 5, 8)).shape == (1, 15, 16)


def test_routing_weights_are_per_image_distributions_at_any_size():
    torch.manual_seed(0)
    layer = RoutingLayer(d_model=16, n_heads=2, d_ff=32, dropout=0.0, attn_dropout=0.0)
    for h, w in [(4, 4), (3, 5)]:
        x = torch.randn(3, h * w, 16) * torch.tensor([1.0, 3.0, 0.3]).view(3, 1, 1)
        y, weights = layer(x, h, w)
        assert y.shape == x.shape
        assert weights["spatial"].shape == (3, 3) and weights["channel"].shape == (3, 2)
        for wts in weights.values():
            assert torch.allclose(wts.sum(-1), torch.ones(3))
        assert not torch.allclose(weights["spatial"][0], weights["spatial"][1])
    with pytest.raises(ValueError, match="3x5"):
        layer(torch.randn(1, 16, 16), 3, 5)


def test_routing_grid_encoder_returns_routing_for_plots():
    model, _ = _tiny("model.grid_layer_type=routing", "model.grid_layers=2")
    encoded = model.encode_all(torch.randn(2, 3, 64, 64))
    assert len(encoded.routing) == 2 and encoded.routing[0]["spatial"].shape == (2, 3)
    with pytest.raises(Exception, match="transformer"):
        _tiny("model.grid_layer_type=mixer")


def test_attention_weights_for_explanations_cover_every_memory_and_the_boxes():
    model, _ = _tiny("model.cap_generator.decoder_name=Concatenated_Parallel")
    model.eval()
    att = model.attention(torch.randn(2, 3, 64, 64), _tokens(2, t=5))
    assert att.token_counts == {"grid": 16, "region": 8, "global": 16}
    assert att.encoded.map_size == (4, 4) and att.encoded.region_boxes.shape == (2, 8, 4)
    assert set(att.weights[0]) == {"grid+region", "region+global"}
    w = att.weights[0]["grid+region"]
    assert w.shape == (2, 5, 16 + 8)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5), atol=1e-5)


def test_generation_works_for_batches_of_different_image_sizes():
    model, _ = _tiny(seed=1)
    model.eval()
    for size in [(64, 64), (96, 128), (128, 64)]:
        out = model.generate(torch.randn(2, 3, *size), beam_size=3, max_len=6, n_best=2)
        assert out.tokens.shape[:2] == (2, 2)
        # every sequence ends with <eos>, then only padding
        for seq in out.tokens.reshape(-1, out.tokens.shape[-1]).tolist():
            end = seq.index(3)
            assert all(t == 1 for t in seq[end + 1 :]) and 3 not in seq[:end]


def test_sampling_at_low_temperature_is_greedy_and_gives_k_samples():
    model, _ = _tiny(seed=2)
    model.eval()
    mem = model.encode(torch.randn(3, 3, 64, 64))
    ids = {"bos_idx": 2, "eos_idx": 3, "pad_idx": 1}
    greedy = greedy_decode(model.decoder, mem, max_len=6, **ids)
    cold = sample_decode(model.decoder, mem, max_len=6, num_samples=4, temperature=1e-4, **ids)
    assert cold.tokens.shape[:2] == (3, 4)
    t = min(greedy.tokens.shape[-1], cold.tokens.shape[-1])
    for k in range(4):
        assert torch.equal(cold.tokens[:, k, :t], greedy.tokens[:, 0, :t])
    gen = torch.Generator().manual_seed(0)
    hot = sample_decode(
        model.decoder, mem, max_len=6, num_samples=4, temperature=5.0, generator=gen, **ids
    )
    assert len({tuple(s) for s in hot.tokens.reshape(12, -1).tolist()}) > 1


# ---- GRIT detector checkpoints (the seed's region_ckpt.pth) ------------------------------------


def grit_detector_state(
    *,
    embed_dim: int,
    depths: list[int],
    num_heads: list[int],
    window: int,
    pos_dim: int,
    d_model: int,
    d_ff: int,
    layers: int,
    levels: int,
    points: int,
    heads: int,
    queries: int,
    classes: int,
) -> dict[str, torch.Tensor]:
    """A state dict with the key names and shapes of GRIT's detector (its Swin backbone with
    the extra merging stage, input projections and Deformable DETR decoder with box refinement),
    as GRIT's ``models/common/swin_model.py`` and ``models/detection/det_module.py`` lay them out.
    Random values; written here from those names and shapes."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    s: dict[str, torch.Tensor] = {
        "backbone.patch_embed.proj.weight": t(embed_dim, 3, 4, 4),
        "backbone.patch_embed.proj.bias": t(embed_dim),
        "backbone.patch_embed.norm.weight": t(embed_dim),
        "backbone.patch_embed.norm.bias": t(embed_dim),
    }
    dims = [embed_dim * 2**i for i in range(len(depths))]
    for i, (dim, depth, nh) in enumerate(zip(dims, depths, num_heads, strict=True)):
        for j in range(depth):
            b = f"backbone.layers.{i}.blocks.{j}."
            s |= {
                b + "norm1.weight": t(dim),
                b + "norm1.bias": t(dim),
                b + "attn.relative_position_bias_table": t((2 * window - 1) ** 2, nh),
                b + "attn.relative_position_index": torch.zeros(window**2, window**2).long(),
                b + "attn.qkv.weight": t(3 * dim, dim),
                b + "attn.qkv.bias": t(3 * dim),
                b + "attn.proj.weight": t(dim, dim),
                b + "attn.proj.bias": t(dim),
                b + "norm2.weight": t(dim),
                b + "norm2.bias": t(dim),
                b + "mlp.fc1.weight": t(4 * dim, dim),
                b + "mlp.fc1.bias": t(4 * dim),
                b + "mlp.fc2.weight": t(dim, 4 * dim),
                b + "mlp.fc2.bias": t(dim),
            }
        out = 2 * dim if i < len(depths) - 1 else pos_dim
        d = f"backbone.layers.{i}.downsample."
        s |= {
            d + "reduction.weight": t(out, 4 * dim),
            d + "norm.weight": t(4 * dim),
            d + "norm.bias": t(4 * dim),
            d + "expansion.weight": t(out, dim),
            d + "norm2.weight": t(dim),
            d + "norm2.bias": t(dim),
        }
    for i in range(1, len(depths)):
        s |= {f"backbone.norm{i}.weight": t(dims[i]), f"backbone.norm{i}.bias": t(dims[i])}
    # GRIT reads stages 1.. plus the extra map: for its 4-stage Swin and 4 levels, the last 4
    channels = [*dims, pos_dim][-levels:]
    for lvl, c in enumerate(channels):
        s |= {
            f"input_proj.{lvl}.0.weight": t(d_model, c, 1, 1),
            f"input_proj.{lvl}.0.bias": t(d_model),
            f"input_proj.{lvl}.1.weight": t(d_model),
            f"input_proj.{lvl}.1.bias": t(d_model),
        }
    dm = "det_module."
    for lid in range(layers):
        b = f"{dm}decoder_layers.{lid}."
        s |= {
            b + "cross_attn.sampling_offsets.weight": t(heads * levels * points * 2, d_model),
            b + "cross_attn.sampling_offsets.bias": t(heads * levels * points * 2),
            b + "cross_attn.attention_weights.weight": t(heads * levels * points, d_model),
            b + "cross_attn.attention_weights.bias": t(heads * levels * points),
            b + "cross_attn.value_proj.weight": t(d_model, d_model),
            b + "cross_attn.value_proj.bias": t(d_model),
            b + "cross_attn.output_proj.weight": t(d_model, d_model),
            b + "cross_attn.output_proj.bias": t(d_model),
            b + "norm1.weight": t(d_model),
            b + "norm1.bias": t(d_model),
            b + "self_attn.in_proj_weight": t(3 * d_model, d_model),
            b + "self_attn.in_proj_bias": t(3 * d_model),
            b + "self_attn.out_proj.weight": t(d_model, d_model),
            b + "self_attn.out_proj.bias": t(d_model),
            b + "norm2.weight": t(d_model),
            b + "norm2.bias": t(d_model),
            b + "linear1.weight": t(d_ff, d_model),
            b + "linear1.bias": t(d_ff),
            b + "linear2.weight": t(d_model, d_ff),
            b + "linear2.bias": t(d_model),
            b + "norm3.weight": t(d_model),
            b + "norm3.bias": t(d_model),
        }
    s |= {
        dm + "reference_points.weight": t(2, d_model),
        dm + "reference_points.bias": t(2),
        dm + "level_embed": t(levels, d_model),
        dm + "query_embed.weight": t(queries, 2 * d_model),
    }
    for k in range(layers + 1):
        s |= {
            f"{dm}class_embed.{k}.weight": t(classes, d_model),
            f"{dm}class_embed.{k}.bias": t(classes),
        }
        for m, (o, i) in enumerate([(d_model, d_model), (d_model, d_model), (4, d_model)]):
            s |= {
                f"{dm}bbox_embed.{k}.layers.{m}.weight": t(o, i),
                f"{dm}bbox_embed.{k}.layers.{m}.bias": t(o),
            }
    return s


def _grit_state_for(cfg) -> dict[str, torch.Tensor]:
    ext, det = cfg.model.extractor, cfg.model.detector
    return grit_detector_state(
        embed_dim=ext.embed_dim,
        depths=list(ext.depths),
        num_heads=list(ext.num_heads),
        window=ext.window_size,
        pos_dim=ext.extra_stage_dim,
        d_model=det.d_model,
        d_ff=det.dim_feedforward,
        layers=det.num_layers,
        levels=det.num_levels,
        points=det.num_points,
        heads=det.num_heads,
        queries=det.num_queries,
        classes=det.num_classes,
    )


def test_grit_region_checkpoint_maps_every_key_onto_the_model(tmp_path, caplog):
    _, cfg = _tiny()
    state = _grit_state_for(cfg)
    path = tmp_path / "region_ckpt.pth"
    torch.save({"model": state}, path)
    with caplog.at_level(logging.INFO, logger="hericap.models.grit_checkpoint"):
        model, _ = _tiny(f"model.detector.checkpoint={path}")
    got = model.state_dict()
    e, r = "extractor.body.", "region_encoder."
    pairs = {
        "backbone.patch_embed.proj.weight": e + "patch_embed.proj.weight",
        "backbone.layers.1.blocks.0.attn.qkv.weight": e + "layers_1.blocks.0.attn.qkv.weight",
        "backbone.layers.0.downsample.reduction.weight": e + "layers_1.downsample.reduction.weight",
        "backbone.layers.1.downsample.reduction.weight": "extractor.extra.reduction.weight",
        "backbone.layers.1.downsample.norm.bias": "extractor.extra.norm.bias",
        "input_proj.2.1.weight": r + "input_proj.2.1.weight",
        "det_module.query_embed.weight": r + "query_embed.weight",
        "det_module.decoder_layers.1.self_attn.in_proj_weight": (
            r + "decoder_layers.1.self_attn.in_proj_weight"
        ),
        "det_module.decoder_layers.0.cross_attn.sampling_offsets.bias": (
            r + "decoder_layers.0.cross_attn.sampling_offsets.bias"
        ),
        "det_module.bbox_embed.2.layers.2.weight": r + "bbox_embed.2.layers.2.weight",
        "det_module.class_embed.0.bias": r + "class_embed.0.bias",
    }
    for grit_key, ours in pairs.items():
        assert torch.equal(got[ours], state[grit_key]), grit_key
    # every tensor of the extractor and region encoder came from the file
    for k, v in got.items():
        if k.startswith(("extractor.", "region_encoder.")):
            assert any(torch.equal(v, s) for s in state.values() if s.shape == v.shape), k
    assert "GRIT creates level_embed but never uses it" in caplog.text
    assert "unused detection-token expansion" in caplog.text


def test_grit_checkpoint_mismatch_lists_keys_unless_partial_loading_is_allowed(tmp_path, caplog):
    _, cfg = _tiny()
    state = _grit_state_for(cfg)
    del state["det_module.query_embed.weight"]
    state["det_module.transformer.extra.weight"] = torch.zeros(3)
    path = tmp_path / "region_ckpt.pth"
    torch.save({"model": state}, path)
    with pytest.raises(RuntimeError) as e:
        _tiny(f"model.detector.checkpoint={path}")
    msg = str(e.value)
    assert "region_encoder.query_embed.weight" in msg
    assert "region_encoder.transformer.extra.weight" in msg
    assert "allow_partial_load" in msg
    with caplog.at_level(logging.WARNING, logger="hericap.models.grit_checkpoint"):
        model, _ = _tiny(
            f"model.detector.checkpoint={path}", "model.detector.allow_partial_load=True"
        )
    assert "loaded partially" in caplog.text and "query_embed" in caplog.text
    assert torch.equal(
        model.state_dict()["region_encoder.decoder_layers.0.linear1.weight"],
        state["det_module.decoder_layers.0.linear1.weight"],
    )


def test_grit_checkpoint_with_region_branch_off_loads_the_backbone_and_says_so(tmp_path, caplog):
    _, cfg = _tiny()
    state = _grit_state_for(cfg)
    path = tmp_path / "region_ckpt.pth"
    torch.save({"model": state}, path)
    report_model = _tiny("model.use_reg_feat=False")[0]
    with caplog.at_level(logging.WARNING, logger="hericap.models.grit_checkpoint"):
        report = load_detector_checkpoint(report_model, path, num_stages=2)
    assert report.diff.clean and report.skipped_branch_off
    assert "use_reg_feat=False" in caplog.text
    assert torch.equal(
        report_model.extractor.extra.reduction.weight,
        state["backbone.layers.1.downsample.reduction.weight"],
    )


@pytest.mark.parametrize("variant", ["Concatenated_Parallel", "Sequential"])
def test_incremental_decoding_equals_full_recomputation_with_every_branch(variant):
    model, _ = _tiny(f"model.cap_generator.decoder_name={variant}", seed=4)
    model.eval()
    with torch.no_grad():
        mem = model.encode(torch.randn(2, 3, 64, 64))
        tokens = _tokens(2, t=7)
        full, _ = model.decoder(tokens, mem)
        cache = model.decoder.init_cache()
        steps = [model.decoder.step(tokens[:, t], mem, cache, t)[0] for t in range(7)]
    assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-5)
