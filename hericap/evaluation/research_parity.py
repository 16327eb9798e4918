"""Compare an imported research model with the research code's own outputs (the oracle).

The oracle (``$HERICAP_REALDATA/research_checkpoints``, its README) holds, per model, the
research checkpoint and config, and the tensors the research code computed on a batch of three
photos: detector outputs, deformable-decoder states, grid/global encoder outputs, teacher-forced
log-probs, beam searches (beam 5 and 3, one and five outputs) and each image alone. This module
imports a model with ``hericap import``'s code, runs HeriCap on the same inputs and reports the
largest absolute difference per stage and how many beams come out token for token; the tests
and ``benchmarks/bench_parity.py`` use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hericap.checkpoint import LoadedCheckpoint, load_checkpoint
from hericap.checkpoint.research import import_research_checkpoint
from hericap.data.transforms import load_image, prepare_batch, resize_spec, resize_to_canvas
from hericap.models.captioner import Captioner
from hericap.models.masks import pixel_padding_mask

__all__ = [
    "BEAMS",
    "NOISE",
    "ORACLE_MODELS",
    "ParityResult",
    "compare_with_oracle",
    "import_oracle_model",
    "oracle_batch",
]

# oracle folder -> research code
ORACLE_MODELS = {
    "grit_parallel": "grit",
    "hiercap_concatenated_parallel": "hiercap",
    "hiercap_sequential": "hiercap",
}
# (beam size, outputs) of the oracle's beam searches; max 20 words
BEAMS = ((5, 1), (5, 5), (3, 1), (3, 5))
BEAM_LEN = 20
# The oracle README's "Tolerances": the research code's own float32 noise (float64 re-run vs
# float32) per tensor; a faithful float32 re-implementation differs by about as much.
NOISE = {
    "det.gri_feat": 1.6e-6,
    "det.glo_feat": 1.6e-6,
    "det.reg_feat": 6.3e-4,
    "det.reg_point": 4.0e-5,
    "det_module.hs": 6.3e-4,
    "det_module.init_reference": 9.9e-8,
    "det_module.inter_references": 5.5e-5,
    "glob_net.out": 8.1e-7,
    "grid_net.out": 6.5e-7,
    "tf.logprobs": 6.2e-5,
}


@dataclass
class ParityResult:
    """``max_abs_diff`` per stage (masks: the share of cells that differ), beams reproduced
    token for token out of ``beams_total`` (the mismatches named), and decoded captions equal
    to the oracle's (``decode`` and the evaluation's ``eval_collapsed``) out of
    ``captions_total``."""

    max_abs_diff: dict[str, float] = field(default_factory=dict)
    beams_identical: int = 0
    beams_total: int = 0
    mismatched_beams: list[str] = field(default_factory=list)
    captions_equal: int = 0
    captions_total: int = 0


def _diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: ours {tuple(ours.shape)}, oracle {tuple(ref.shape)}")
    if ref.dtype == torch.bool:
        return float((ours != ref).float().mean())
    return float((ours.float() - ref.float()).abs().max())


def import_oracle_model(oracle: Path, name: str, out: Path) -> LoadedCheckpoint:
    """``hericap import`` of the oracle's ``name`` model into ``out``, loaded back."""
    folder = oracle / name
    import_research_checkpoint(
        ORACLE_MODELS[name],
        folder / "checkpoint.pth",
        folder / "config.yaml",
        oracle / "vocab.json",
        out,
    )
    return load_checkpoint(out)


def oracle_batch(oracle: Path, model: Captioner, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's photos through HeriCap's own transform (``spec``: the checkpoint's resize)
    and padding: the model's input batch and the images' sizes."""
    info = json.loads((oracle / "inputs.json").read_text())
    canvases, sizes = zip(
        *(
            resize_to_canvas(load_image((oracle / image["path"]).read_bytes()), spec)
            for image in info["images"]
        ),
        strict=True,
    )
    return prepare_batch(
        np.stack(canvases), np.asarray(sizes), model.input_multiple, model.zero_padding
    )


def _encoders(model: Captioner, x, hw, ref, out: ParityResult) -> None:
    encoded = model.encode_all(x, hw, details=True)
    maps, masks, region = (encoded.details[k] for k in ("maps", "level_masks", "region"))
    d = out.max_abs_diff
    d["det.gri_feat"] = _diff(maps[-1].flatten(1, 2), ref["det.gri_feat"])
    levels = [_diff(masks[-4 + i], ref[f"det_module.mask.level{i}"]) for i in range(4)]
    d["det.masks"] = max(levels)
    d["det.reg_feat"] = _diff(region.features, ref["det.reg_feat"])
    d["det_module.hs"] = _diff(region.hidden_states, ref["det_module.hs"])
    d["det_module.init_reference"] = _diff(region.references[0], ref["det_module.init_reference"])
    d["det_module.inter_references"] = _diff(region.references, ref["det_module.inter_references"])
    d["grid_net.out"] = _diff(encoded.memories["grid"], ref["grid_net.out"][:, -1])
    d["grid_net.mask"] = _diff(encoded.masks["grid"], ref["grid_net.mask"].flatten(1))
    if "det.reg_point" in ref:
        d["det.reg_point"] = _diff(region.boxes, ref["det.reg_point"])
    if "glob_net.out" in ref:
        d["det.glo_feat"] = _diff(maps[-1].permute(0, 3, 1, 2), ref["det.glo_feat"])
        d["glob_net.out"] = _diff(encoded.memories["global"], ref["glob_net.out"][:, -1])
        d["glob_net.mask"] = _diff(encoded.masks["global"], ref["glob_net.mask"].flatten(1))


def _beams(loaded: LoadedCheckpoint, x, hw, ref, captions: dict, out: ParityResult) -> None:
    model, vocab = loaded.model, loaded.vocab
    worst = 0.0
    searches = {}  # one search per beam size: fewer outputs are the first of more
    for k in sorted({k for k, _ in BEAMS}):
        most = max(n for size, n in BEAMS if size == k)
        searches[k] = model.generate(x, beam_size=k, max_len=BEAM_LEN, n_best=most, image_hw=hw)
    for k, n in BEAMS:
        key = f"beam.b{k}_o{n}"
        got, kept = searches[k], min(n, k)
        tokens = got.tokens[:, 0] if n == 1 else got.tokens[:, :kept]
        per_token = got.token_log_probs[:, 0] if n == 1 else got.token_log_probs[:, :kept]
        _count_beams(tokens, ref[f"{key}.tokens"], key, out)
        worst = max(worst, _diff(per_token, ref[f"{key}.logprobs"]))
        for kind in ("decode", "eval_collapsed"):
            expected = captions.get(key, {}).get(kind)
            if expected is None:
                continue
            rows = tokens.reshape(-1, tokens.shape[-1])
            flat = np.asarray(expected, dtype=object).reshape(-1).tolist()
            ours = [vocab.decode(r.tolist(), collapse_repeats=kind != "decode") for r in rows]
            out.captions_equal += sum(a == b for a, b in zip(ours, flat, strict=True))
            out.captions_total += len(flat)
    out.max_abs_diff["beam.logprobs"] = worst


def _count_beams(tokens: torch.Tensor, ref: torch.Tensor, key: str, out: ParityResult) -> None:
    rows, ref_rows = tokens.reshape(-1, tokens.shape[-1]), ref.reshape(-1, ref.shape[-1])
    for i, (a, b) in enumerate(zip(rows, ref_rows, strict=True)):
        out.beams_total += 1
        if torch.equal(a, b):
            out.beams_identical += 1
        else:
            out.mismatched_beams.append(f"{key}[{i}]")


def _singles(model: Captioner, x, hw, ref, out: ParityResult) -> None:
    feats, regs, logps = [], [], []
    for i, (h, w) in enumerate(hw.tolist()):
        alone = x[i : i + 1, :, :h, :w]  # the image by itself: no padding at all
        encoded = model.encode_all(alone, details=True)
        grid = encoded.details["maps"][-1].flatten(1, 2)
        feats.append(_diff(grid, ref[f"single{i}.det.gri_feat"]))
        regs.append(_diff(encoded.details["region"].features, ref[f"single{i}.det.reg_feat"]))
        got = model.generate(alone, beam_size=5, max_len=BEAM_LEN, n_best=1)
        _count_beams(got.tokens[:, 0], ref[f"single{i}.beam.b5_o1.tokens"], f"single{i}", out)
        logps.append(_diff(got.token_log_probs[:, 0], ref[f"single{i}.beam.b5_o1.logprobs"]))
    out.max_abs_diff["single.det.gri_feat"] = max(feats)
    out.max_abs_diff["single.det.reg_feat"] = max(regs)
    out.max_abs_diff["single.beam.logprobs"] = max(logps)


@torch.no_grad()
def compare_with_oracle(loaded: LoadedCheckpoint, oracle: Path, name: str) -> ParityResult:
    """Run ``loaded`` (an import of the oracle's ``name``) on the oracle's inputs: first the
    photos through the checkpoint's own transform (compared with the oracle's batch and mask),
    then every stage on the oracle's batch.

    Args:
        loaded: the imported checkpoint.
        oracle: the oracle folder (its photos are at the paths ``inputs.json`` names).
        name: the oracle model (a key of :data:`ORACLE_MODELS`).
    """
    inputs = torch.load(oracle / "inputs.pt", map_location="cpu", weights_only=True)
    ref = torch.load(oracle / name / "outputs.pt", map_location="cpu", weights_only=True)
    captions = json.loads((oracle / name / "outputs.json").read_text()).get("captions", {})
    model = loaded.model.eval()
    out = ParityResult()
    x, hw = oracle_batch(oracle, model, resize_spec(loaded.config.dataset))
    out.max_abs_diff["preprocess.batch"] = _diff(x, inputs["batch"])
    out.max_abs_diff["preprocess.mask"] = _diff(
        pixel_padding_mask(hw, x.shape[2], x.shape[3]), inputs["mask"]
    )
    x, hw = inputs["batch"], inputs["resized_hw"]
    _encoders(model, x, hw, ref, out)
    logprobs = model(x, inputs["tf_seq"], image_hw=hw)
    out.max_abs_diff["tf.logprobs"] = _diff(logprobs, ref["tf.logprobs"])
    _beams(loaded, x, hw, ref, captions, out)
    _singles(model, x, hw, ref, out)
    return out
