"""Model shapes, gradients, fusion registry, strict checkpoint loading and decoding."""

from __future__ import annotations

import pytest
import torch

from hericap.config import load_config
from hericap.models import FUSION_REGISTRY, build_captioner, canonical_fusion_name
from hericap.models.decoding import beam_search, greedy_decode
from hericap.models.weights import load_state_dict_strict

VOCAB = 40


def _model(*overrides: str, seed: int = 0):
    cfg = load_config(
        [
            "preset=demo",
            "model.d_model=32",
            "model.n_heads=2",
            "model.d_ff=64",
            "model.grid_layers=1",
            "model.cap_generator.n_layers=2",
            "model.extractor.embed_dim=16",
            *overrides,
        ]
    )
    torch.manual_seed(seed)
    return build_captioner(cfg.model, VOCAB, image_size=64)


def _tokens(n: int, t: int = 7) -> torch.Tensor:
    x = torch.randint(4, VOCAB, (n, t))
    x[:, 0] = 2
    return x


def test_forward_backward_shapes_and_every_parameter_gets_a_gradient():
    model = _model()
    images = torch.randn(3, 3, 64, 64)
    tokens = _tokens(3 * 2)
    log_probs = model(images, tokens, captions_per_image=2)
    assert log_probs.shape == (6, 7, VOCAB)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(6, 7), atol=1e-4)
    log_probs.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []


@pytest.mark.parametrize("variant", list(FUSION_REGISTRY))
def test_every_fusion_variant_builds_and_uses_all_parameters(variant):
    model = _model(f"model.cap_generator.decoder_name={variant}")
    model(torch.randn(2, 3, 64, 64), _tokens(2)).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_fusion_names_case_insensitive_with_aliases():
    assert canonical_fusion_name("parallel") == "Parallel"
    assert canonical_fusion_name("SEQUENTIAL") == "Sequential"
    assert canonical_fusion_name("concat") == "Concatenated_Parallel"
    assert canonical_fusion_name("concatenated_sequential") == "Concatenated_Sequential"
    with pytest.raises(ValueError, match="Parallel"):
        canonical_fusion_name("pyramid")


def test_folded_captions_equal_repeated_memories():
    model = _model().eval()
    images, tokens = torch.randn(2, 3, 64, 64), _tokens(2 * 3)
    folded = model(images, tokens, captions_per_image=3)
    mem = model.encode(images)
    repeated, _ = model.decoder(tokens, {k: v.repeat_interleave(3, 0) for k, v in mem.items()})
    assert torch.allclose(folded, repeated, atol=1e-5)


def _padded_tokens(lengths: list[int], t: int) -> torch.Tensor:
    x = _tokens(len(lengths), t)
    for row, n in enumerate(lengths):
        x[row, n:] = 1  # <pad>
    return x


@pytest.mark.parametrize("variant", sorted(FUSION_REGISTRY))
def test_packed_teacher_forcing_equals_dense_with_gradients(variant):
    """The decoder skips padded positions (packed rows); the dense pass (``need_weights``
    computes every position) gives the same log-probs and gradients where the input is a word."""
    model = _model(
        f"model.cap_generator.decoder_name={variant}",
        "model.use_glob_feat=true",
        "model.dropout=0.0",
        "model.attn_dropout=0.0",
    )
    images = torch.randn(2, 3, 64, 64)
    tokens = _padded_tokens([7, 3, 5, 1, 6, 4], t=7)  # 3 captions per image
    keep = tokens != 1

    def run(dense: bool):
        model.zero_grad()
        mem = model.encode(images)
        lp, _ = model.decoder(tokens, mem, captions_per_memory=3, need_weights=dense)
        (lp * keep[..., None]).sum().backward()
        return lp, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed, packed_grads = run(dense=False)
    dense, dense_grads = run(dense=True)
    assert torch.allclose(packed[keep], dense[keep], atol=1e-5)
    assert (packed[~keep] == 0).all(), "padded positions are not computed"
    assert not (dense[~keep] == 0).all()
    assert packed_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        # float32 sums in another order: an entry that cancels to ~0 keeps an error of the
        # tensor's scale (1.9e-5 on a bias whose entries reach 55, on an AVX-512 CPU), so the
        # absolute tolerance follows the largest entry; a leaked padded position is far larger
        scale = max(1.0, grad.abs().max().item())
        assert torch.allclose(packed_grads[name], grad, rtol=1e-5, atol=1e-5 * scale), name


def test_padding_inside_a_caption_is_computed_densely():
    model = _model().eval()
    mem = model.encode(torch.randn(2, 3, 64, 64))
    tokens = _padded_tokens([6, 6], t=6)
    tokens[0, 2] = 1  # not a suffix: packing would change what later positions attend
    lp, _ = model.decoder(tokens, mem)
    dense, _ = model.decoder(tokens, mem, need_weights=True)
    assert torch.allclose(lp, dense, atol=1e-6)


def test_folded_incremental_steps_equal_repeated_memories():
    """Beams and samples attend their image's memory unrepeated (``captions_per_memory``)."""
    model = _model().eval()
    mem = model.encode(torch.randn(2, 3, 64, 64))
    repeated = {k: v.repeat_interleave(3, 0) for k, v in mem.items()}
    tokens = _tokens(6, t=5)
    folded_cache, repeated_cache = model.decoder.init_cache(), model.decoder.init_cache()
    for t in range(5):
        folded, _ = model.decoder.step(tokens[:, t], mem, folded_cache, t, captions_per_memory=3)
        plain, _ = model.decoder.step(tokens[:, t], repeated, repeated_cache, t)
        assert torch.allclose(folded, plain, atol=1e-5)


def test_incremental_decoding_equals_full_recomputation():
    model = _model().eval()
    mem = model.encode(torch.randn(2, 3, 64, 64))
    tokens = _tokens(2, t=6)
    full, _ = model.decoder(tokens, mem)
    cache = model.decoder.init_cache()
    steps = [model.decoder.step(tokens[:, t], mem, cache, t)[0] for t in range(6)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5)


def test_beam_one_equals_greedy_and_outputs_are_consistent():
    model = _model(seed=1).eval()
    images = torch.randn(4, 3, 64, 64)
    greedy = model.generate(images, beam_size=1, max_len=8)
    beam1 = model.generate(images, beam_size=1, max_len=8)
    mem = model.encode(images)
    beam = beam_search(model.decoder, mem, beam_size=1, max_len=8, bos_idx=2, eos_idx=3, pad_idx=1)
    g = greedy_decode(model.decoder, mem, max_len=8, bos_idx=2, eos_idx=3, pad_idx=1)
    assert torch.equal(greedy.tokens, beam1.tokens)
    t = min(beam.tokens.shape[-1], g.tokens.shape[-1])
    assert torch.equal(beam.tokens[..., :t], g.tokens[..., :t])
    assert torch.allclose(beam.log_probs, g.log_probs, atol=1e-5)


def test_beam_search_n_best_sorted_and_finished_beams_stay_finished():
    model = _model(seed=2).eval()
    mem = model.encode(torch.randn(3, 3, 64, 64))
    out = beam_search(
        model.decoder, mem, beam_size=4, max_len=6, bos_idx=2, eos_idx=3, pad_idx=1, n_best=4
    )
    assert out.tokens.shape[:2] == (3, 4)
    assert (out.log_probs[:, :-1] >= out.log_probs[:, 1:] - 1e-6).all()
    for seq in out.tokens.reshape(-1, out.tokens.shape[-1]).tolist():
        assert 3 in seq, "every beam ends with <eos> (forced after max_len words)"
        end = seq.index(3)
        assert all(tok == 1 for tok in seq[end + 1 :]), "after <eos> only padding"
        assert 2 not in seq and 1 not in seq[:end]
        assert end <= 6
    # the reported log-prob is the sum of the step log-probs of the returned sequence
    seq = out.tokens[0, 0]
    n = int(out.lengths[0, 0])
    full, _ = model.decoder(
        torch.cat([torch.tensor([2]), seq[: n - 1]])[None], {k: v[:1] for k, v in mem.items()}
    )
    manual = full[0].gather(1, seq[:n, None]).sum()
    assert torch.allclose(manual, out.log_probs[0, 0], atol=1e-4)


def test_beam_search_beats_or_matches_greedy_log_prob():
    model = _model(seed=3).eval()
    mem = model.encode(torch.randn(4, 3, 64, 64))
    g = greedy_decode(model.decoder, mem, max_len=8, bos_idx=2, eos_idx=3, pad_idx=1)
    b = beam_search(model.decoder, mem, beam_size=5, max_len=8, bos_idx=2, eos_idx=3, pad_idx=1)
    assert (b.log_probs[:, 0] >= g.log_probs[:, 0] - 1e-5).all()


def test_strict_load_lists_missing_and_unexpected_keys():
    model = _model()
    state = model.state_dict()
    state.pop("decoder.out.weight")
    state["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as e:
        load_state_dict_strict(model, state, what="test state")
    assert "decoder.out.weight" in str(e.value) and "decoder.extra.weight" in str(e.value)


def test_frozen_stages_freeze_the_backbone_start():
    model = _model("model.frozen_stages=1")
    frozen = {n for n, p in model.extractor.named_parameters() if not p.requires_grad}
    assert any("patch_embed" in n for n in frozen) and any("layers_0" in n for n in frozen)
    assert not any("layers_1" in n for n in frozen)


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_extractor_stems_give_the_same_map_shapes(stem):
    from hericap.models.encoders import SwinExtractor

    ext = SwinExtractor(64, 4, 16, (2, 2), (2, 4), 8, stem=stem)
    maps = ext(torch.randn(2, 3, 64, 64))
    assert [m.shape for m in maps] == [(2, 16, 16, 16), (2, 8, 8, 32)]
    assert ext.channels == [16, 32] and ext.reductions == [4, 8]


def test_unknown_stem_lists_the_known_ones():
    from hericap.models.encoders import SwinExtractor

    with pytest.raises(ValueError, match="conv"):
        SwinExtractor(64, 4, 16, (2, 2), (2, 4), 8, stem="resnet")
