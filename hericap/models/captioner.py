"""The captioning model: extractor -> sub-encoders -> hierarchical decoder.

The extractor's maps feed up to three sub-encoders, each giving the decoder one memory: ``grid``
(the coarsest map, :class:`~hericap.models.encoders.GridEncoder`), ``region`` (the last
``n_levels`` maps, :class:`~hericap.models.region.RegionEncoder`) and ``global`` (the coarsest
map, :class:`~hericap.models.global_encoder.GlobalEncoder` or HierCap's
:class:`~hericap.models.research_global.ResearchGlobalEncoder`).

Batches of differently sized images come as one padded tensor and the images' real sizes
(``image_hw``). How the padding is treated is the ``padding`` rule (``model.padding``):

* ``by_size`` (HeriCap): images are grouped by their own padded size (their size rounded up to
  the coarsest stride) and each group is encoded on its own, so an image's features, and its
  captions, are the same alone and in any batch; the memories of different sizes are then
  padded to one length with padding masks for the decoder.
* ``research``: the research code's way: the whole zero-padded batch goes through Swin, which
  attends over the padding (an image's features depend on its batch), and the padding mask is
  used where the research code uses it: grid self-attention, the deformable attention (value
  masking, valid ratios), the global branch and the decoder's cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hericap.models.decoder import HierarchicalDecoder
from hericap.models.decoding import DecodeControls, DecodeOutput, Memories, decode_memories
from hericap.models.encoders import GridEncoder, SwinExtractor
from hericap.models.global_encoder import GlobalEncoder
from hericap.models.masks import level_masks, pixel_padding_mask
from hericap.models.region import RegionEncoder, RegionOutput
from hericap.models.research_global import ResearchGlobalEncoder

__all__ = ["PADDINGS", "Attention", "Captioner", "Encoded"]

# Padding rules (``model.padding``; see the module docstring).
PADDINGS = ("by_size", "research")


@dataclass
class Encoded:
    """What the encoders produce for a batch: the decoder's ``memories`` and their padding
    ``masks`` (``{name: [B, tokens]}``, True = padding; None when nothing is padded), the
    coarsest map's ``map_size (h, w)`` (grid and global tokens are that map, row-major; the
    largest when images were encoded per size), the ``region_boxes [B, Q, 4]`` (cx, cy, w, h in
    [0, 1]; None without the region branch), per routing layer the per-image ``routing``
    weights and, when asked for, ``details``: the extractor's ``maps``, their ``level_masks``
    and the ``region`` output with its per-layer states (for parity checks)."""

    memories: Memories
    map_size: tuple[int, int]
    region_boxes: torch.Tensor | None = None
    routing: list[dict[str, torch.Tensor]] = field(default_factory=list)
    masks: dict[str, torch.Tensor] | None = None
    details: dict[str, object] = field(default_factory=dict)


@dataclass
class Attention:
    """Per-word cross-attention for explanations: ``weights[layer][group]`` is ``[B, T, tokens]``
    over a fusion group's memory tokens (group ``grid``, ``region``, ``global`` or a
    concatenation such as ``grid+region``, tokens in that order), ``token_counts`` says how many
    tokens each memory has, and ``encoded`` carries boxes, map size and routing weights."""

    weights: list[dict[str, torch.Tensor]]
    token_counts: dict[str, int]
    encoded: Encoded


def _merge_by_size(parts: list[tuple[torch.Tensor, Encoded]], batch: int) -> Encoded:
    """Encodings of groups of images (``(indices, encoded)``) -> one batch, memories padded to
    the longest with padding masks (only where lengths differ)."""
    first = parts[0][1]
    memories: Memories = {}
    masks: dict[str, torch.Tensor] = {}
    for name, ref in first.memories.items():
        longest = max(enc.memories[name].shape[1] for _, enc in parts)
        out = ref.new_zeros(batch, longest, ref.shape[2])
        padding = torch.ones(batch, longest, dtype=torch.bool, device=ref.device)
        for idx, enc in parts:
            n = enc.memories[name].shape[1]
            out[idx, :n] = enc.memories[name]
            padding[idx, :n] = False
        memories[name] = out
        if bool(padding.any()):
            masks[name] = padding
    boxes = None
    if first.region_boxes is not None:
        boxes = first.region_boxes.new_empty(batch, *first.region_boxes.shape[1:])
        for idx, enc in parts:
            boxes[idx] = enc.region_boxes
    routing = []
    for layer, weights in enumerate(first.routing):
        merged = {}
        for key, ref in weights.items():
            merged[key] = ref.new_empty(batch, *ref.shape[1:])
            for idx, enc in parts:
                merged[key][idx] = enc.routing[layer][key]
        routing.append(merged)
    map_size = max((enc.map_size for _, enc in parts), key=lambda hw: hw[0] * hw[1])
    return Encoded(memories, map_size, boxes, routing, masks or None)


class Captioner(nn.Module):
    """Image captioner.

    Args:
        extractor: backbone returning NHWC feature maps, finest first.
        decoder: hierarchical decoder over the memories.
        grid_encoder: grid sub-encoder over the last map (None: branch off).
        region_encoder: region sub-encoder over the last maps (None: branch off).
        global_encoder: global sub-encoder over the last map (None: branch off).
        region_proj: maps region features to the decoder's width (identity when equal).
        bos_idx: begin-of-sentence token; ``eos_idx`` and ``pad_idx`` likewise.
        padding: ``by_size`` or ``research`` (see the module docstring).
        search: beam search rule, ``hericap`` or ``research``
            (:func:`~hericap.models.decoding.research_beam_search`).
    """

    def __init__(
        self,
        extractor: SwinExtractor,
        decoder: HierarchicalDecoder,
        grid_encoder: GridEncoder | None = None,
        region_encoder: RegionEncoder | None = None,
        global_encoder: GlobalEncoder | ResearchGlobalEncoder | None = None,
        region_proj: nn.Module | None = None,
        bos_idx: int = 2,
        eos_idx: int = 3,
        pad_idx: int = 1,
        padding: str = "by_size",
        search: str = "hericap",
    ) -> None:
        super().__init__()
        if grid_encoder is None and region_encoder is None and global_encoder is None:
            raise ValueError("a captioner needs at least one of the grid/region/global encoders")
        if padding not in PADDINGS:
            raise ValueError(f"unknown model.padding={padding!r}; known: {list(PADDINGS)}")
        if search not in ("hericap", "research"):
            raise ValueError(f"unknown model.beam_search={search!r}; known: hericap, research")
        self.padding, self.search = padding, search
        self.extractor = extractor
        self.grid_encoder = grid_encoder
        self.region_encoder = region_encoder
        self.global_encoder = global_encoder
        self.region_proj = region_proj if region_proj is not None else nn.Identity()
        self.decoder = decoder
        self.bos_idx, self.eos_idx, self.pad_idx = bos_idx, eos_idx, pad_idx
        # what the sub-modules froze themselves (frozen Swin stages, the detector's box heads):
        # unfreezing the backbone never unfreezes these
        self._always_frozen = {n for n, p in self.named_parameters() if not p.requires_grad}

    # the extractor and the region detector: the paper's "backbone" (its own learning rate,
    # frozen in the freezing phases)
    BACKBONE_PREFIXES = ("extractor.", "region_encoder.")

    def freeze_backbone(self, frozen: bool) -> int:
        """Freeze (or unfreeze) the extractor and the region detector, the paper's "freezing"
        phases; returns how many parameter tensors changed."""
        changed = 0
        for name, p in self.named_parameters():
            backbone = name.startswith(self.BACKBONE_PREFIXES)
            if backbone and name not in self._always_frozen and p.requires_grad == frozen:
                p.requires_grad_(not frozen)
                changed += 1
        return changed

    @property
    def input_multiple(self) -> int:
        """What padded batches are trimmed to multiples of: the coarsest feature stride, or 1
        with the research padding (the research code pads to the largest image exactly)."""
        return 1 if self.padding == "research" else self.extractor.reductions[-1]

    @property
    def zero_padding(self) -> bool:
        """Whether the batch's padding must be 0 after normalisation (the research code's);
        otherwise the canvas's mean colour stays."""
        return self.padding == "research"

    @property
    def memory_names(self) -> list[str]:
        encoders = {"grid": self.grid_encoder, "region": self.region_encoder}
        encoders["global"] = self.global_encoder
        return [name for name, enc in encoders.items() if enc is not None]

    def encode_all(
        self,
        images: torch.Tensor,
        image_hw: torch.Tensor | None = None,
        details: bool = False,
    ) -> Encoded:
        """``images [B, 3, H, W]`` (normalised; image ``i`` in the top-left ``image_hw[i]``
        pixels, None: all of it) -> memories plus what explanations need.

        ``details`` (parity checks) also returns intermediate outputs; it encodes the batch in
        one pass (with the research padding's masks when that is the rule).
        """
        if image_hw is None or self.padding == "research" or details:
            return self._encode(images, image_hw if self.padding == "research" else None, details)
        m = self.input_multiple
        height, width = images.shape[2], images.shape[3]
        own = ((image_hw + m - 1) // m) * m
        own = torch.minimum(own, torch.tensor([height, width], device=own.device))
        sizes = [tuple(hw) for hw in own.tolist()]
        if all(hw == (height, width) for hw in sizes):
            return self._encode(images, None, False)
        parts = []
        for h, w in sorted(set(sizes)):
            rows = [i for i, hw in enumerate(sizes) if hw == (h, w)]
            idx = torch.tensor(rows, device=images.device)
            parts.append((idx, self._encode(images[idx, :, :h, :w], None, False)))
        return _merge_by_size(parts, images.shape[0])

    def _encode(
        self, images: torch.Tensor, image_hw: torch.Tensor | None, details: bool
    ) -> Encoded:
        """One pass over the batch; ``image_hw`` given: padding masks as the research code."""
        maps = self.extractor(images)
        masks = None
        if image_hw is not None:
            pixels = pixel_padding_mask(image_hw.to(images.device), *images.shape[2:])
            masks = level_masks(pixels, maps)
        coarse = None if masks is None else masks[-1]
        flat = None if coarse is None else coarse.flatten(1)
        memories: Memories = {}
        memory_masks: dict[str, torch.Tensor] = {}
        encoded = Encoded(memories=memories, map_size=(maps[-1].shape[1], maps[-1].shape[2]))
        region: RegionOutput | None = None
        if self.grid_encoder is not None:
            memories["grid"], encoded.routing = self.grid_encoder(maps[-1], padding=flat)
            if flat is not None:
                memory_masks["grid"] = flat
        if self.region_encoder is not None:
            region = self.region_encoder(maps, masks=masks, return_intermediate=details)
            memories["region"] = self.region_proj(region.features)
            encoded.region_boxes = region.boxes
        if self.global_encoder is not None:
            memories["global"], global_mask = self.global_encoder.encode(maps[-1], coarse)
            if global_mask is not None:
                memory_masks["global"] = global_mask
        encoded.masks = memory_masks or None
        if details:
            encoded.details = {"maps": maps, "level_masks": masks, "region": region}
        return encoded

    def encode(self, images: torch.Tensor, image_hw: torch.Tensor | None = None) -> Memories:
        """``images [B, 3, H, W]`` (normalised) -> memories ``{"grid"|"region"|"global":
        [B, N, D]}`` (see :meth:`encode_all` for the masks)."""
        return self.encode_all(images, image_hw).memories

    @torch.no_grad()
    def attention(
        self, images: torch.Tensor, tokens: torch.Tensor, image_hw: torch.Tensor | None = None
    ) -> Attention:
        """Cross-attention of each word of ``tokens [B, T]`` (``<bos>`` first: the decoder's
        inputs, as teacher forcing feeds them) over the visual tokens, for heatmaps."""
        encoded = self.encode_all(images, image_hw)
        _, weights = self.decoder(
            tokens, encoded.memories, need_weights=True, memory_masks=encoded.masks
        )
        counts = {k: v.shape[1] for k, v in encoded.memories.items()}
        return Attention(weights=weights, token_counts=counts, encoded=encoded)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor | None = None,
        captions_per_image: int = 1,
        decode: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        image_hw: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """XE: teacher-forced log-probs ``[B * captions_per_image, T, V]`` of ``tokens``.

        ``tokens`` holds ``captions_per_image`` captions per image, image-major; each image is
        encoded once and all its captions attend the same memories. ``image_hw [B, 2]``: the
        images' real sizes in a padded batch (see the module docstring).

        SCST (``decode`` given, ``tokens`` None): ``decode(self, memories)`` produces sequences
        ``[B, k, T]`` (and optionally baseline sequences) without gradients, with the decoder in
        eval mode; returns the per-token log-probs ``[B * k, T]`` of those sequences, with
        gradients, then the sequences and the baseline sequences. Both passes run inside this
        ``forward`` so DDP sees one forward per step. When the memories are padded, ``decode``
        is called as ``decode(self, memories, memory_masks=masks)``.
        """
        encoded = self.encode_all(images, image_hw)
        memories, masks = encoded.memories, encoded.masks
        if decode is None:
            if tokens is None:
                raise ValueError("tokens are needed for teacher forcing")
            log_probs, _ = self.decoder(
                tokens, memories, captions_per_memory=captions_per_image, memory_masks=masks
            )
            return log_probs
        was_training = self.decoder.training
        self.decoder.eval()
        with torch.no_grad():
            detached = {k: v.detach() for k, v in memories.items()}
            if masks is None:
                sequences, baseline = decode(self, detached)
            else:
                sequences, baseline = decode(self, detached, memory_masks=masks)
        self.decoder.train(was_training)
        b, k, t = sequences.shape
        flat = sequences.reshape(b * k, t)
        bos = torch.full((b * k, 1), self.bos_idx, dtype=flat.dtype, device=flat.device)
        inputs = torch.cat([bos, flat[:, :-1]], dim=1)
        log_probs, _ = self.decoder(inputs, memories, captions_per_memory=k, memory_masks=masks)
        token_log_probs = log_probs.gather(-1, flat.unsqueeze(-1)).squeeze(-1)
        return token_log_probs, sequences, baseline

    @property
    def token_ids(self) -> tuple[int, int, int]:
        """``(bos, eos, pad)``."""
        return self.bos_idx, self.eos_idx, self.pad_idx

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        beam_size: int = 5,
        max_len: int = 20,
        n_best: int = 1,
        image_hw: torch.Tensor | None = None,
        controls: DecodeControls | None = None,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> DecodeOutput:
        """Caption images: greedy when ``beam_size == 1``, else beam search (with the research
        search rule: the research beam search, whatever the beam size); ``sample``: ``n_best``
        samples per image. ``controls``: the ``decode.*`` controls (None: all off);
        :func:`~hericap.models.decoding.decode_memories` says which apply where."""
        encoded = self.encode_all(images, image_hw)
        return decode_memories(
            self.decoder,
            encoded.memories,
            self.token_ids,
            search=self.search,
            beam_size=beam_size,
            max_len=max_len,
            n_best=n_best,
            memory_masks=encoded.masks,
            controls=controls,
            sample=sample,
            generator=generator,
        )
