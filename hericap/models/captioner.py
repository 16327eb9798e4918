"""The captioning model: extractor -> sub-encoders -> hierarchical decoder.

The extractor's maps feed up to three sub-encoders, each giving the decoder one memory: ``grid``
(the coarsest map, :class:`~hericap.models.encoders.GridEncoder`), ``region`` (the last
``n_levels`` maps, :class:`~hericap.models.region.RegionEncoder`) and ``global`` (the coarsest
map, :class:`~hericap.models.global_encoder.GlobalEncoder`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from hericap.models.decoder import HierarchicalDecoder
from hericap.models.decoding import DecodeOutput, Memories, beam_search, greedy_decode
from hericap.models.encoders import GridEncoder, SwinExtractor
from hericap.models.global_encoder import GlobalEncoder
from hericap.models.region import RegionEncoder

__all__ = ["Attention", "Captioner", "Encoded"]


@dataclass
class Encoded:
    """What the encoders produce for a batch: the decoder's ``memories``, the coarsest map's
    ``map_size (h, w)`` (grid and global tokens are that map, row-major), the ``region_boxes
    [B, Q, 4]`` (cx, cy, w, h in [0, 1]; None without the region branch) and, per routing layer,
    the per-image ``routing`` weights."""

    memories: Memories
    map_size: tuple[int, int]
    region_boxes: torch.Tensor | None = None
    routing: list[dict[str, torch.Tensor]] = field(default_factory=list)


@dataclass
class Attention:
    """Per-word cross-attention for explanations: ``weights[layer][group]`` is ``[B, T, tokens]``
    over a fusion group's memory tokens (group ``grid``, ``region``, ``global`` or a
    concatenation such as ``grid+region``, tokens in that order), ``token_counts`` says how many
    tokens each memory has, and ``encoded`` carries boxes, map size and routing weights."""

    weights: list[dict[str, torch.Tensor]]
    token_counts: dict[str, int]
    encoded: Encoded


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
    """

    def __init__(
        self,
        extractor: SwinExtractor,
        decoder: HierarchicalDecoder,
        grid_encoder: GridEncoder | None = None,
        region_encoder: RegionEncoder | None = None,
        global_encoder: GlobalEncoder | None = None,
        region_proj: nn.Module | None = None,
        bos_idx: int = 2,
        eos_idx: int = 3,
        pad_idx: int = 1,
    ) -> None:
        super().__init__()
        if grid_encoder is None and region_encoder is None and global_encoder is None:
            raise ValueError("a captioner needs at least one of the grid/region/global encoders")
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
        """The coarsest feature stride: padded batches are trimmed to multiples of it."""
        return self.extractor.reductions[-1]

    @property
    def memory_names(self) -> list[str]:
        encoders = {"grid": self.grid_encoder, "region": self.region_encoder}
        encoders["global"] = self.global_encoder
        return [name for name, enc in encoders.items() if enc is not None]

    def encode_all(self, images: torch.Tensor) -> Encoded:
        """``images [B, 3, H, W]`` (normalised) -> memories plus what explanations need."""
        maps = self.extractor(images)
        memories: Memories = {}
        encoded = Encoded(memories=memories, map_size=(maps[-1].shape[1], maps[-1].shape[2]))
        if self.grid_encoder is not None:
            memories["grid"], encoded.routing = self.grid_encoder(maps[-1])
        if self.region_encoder is not None:
            region = self.region_encoder(maps)
            memories["region"] = self.region_proj(region.features)
            encoded.region_boxes = region.boxes
        if self.global_encoder is not None:
            memories["global"] = self.global_encoder(maps[-1])
        return encoded

    def encode(self, images: torch.Tensor) -> Memories:
        """``images [B, 3, H, W]`` (normalised) -> memories ``{"grid"|"region"|"global":
        [B, N, D]}``."""
        return self.encode_all(images).memories

    @torch.no_grad()
    def attention(self, images: torch.Tensor, tokens: torch.Tensor) -> Attention:
        """Cross-attention of each word of ``tokens [B, T]`` (``<bos>`` first: the decoder's
        inputs, as teacher forcing feeds them) over the visual tokens, for heatmaps."""
        encoded = self.encode_all(images)
        _, weights = self.decoder(tokens, encoded.memories, need_weights=True)
        counts = {k: v.shape[1] for k, v in encoded.memories.items()}
        return Attention(weights=weights, token_counts=counts, encoded=encoded)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor | None = None,
        captions_per_image: int = 1,
        decode: Callable[[Captioner, Memories], tuple[torch.Tensor, torch.Tensor | None]]
        | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """XE: teacher-forced log-probs ``[B * captions_per_image, T, V]`` of ``tokens``.

        ``tokens`` holds ``captions_per_image`` captions per image, image-major; each image is
        encoded once and all its captions attend the same memories.

        SCST (``decode`` given, ``tokens`` None): ``decode(self, memories)`` produces sequences
        ``[B, k, T]`` (and optionally baseline sequences) without gradients, with the decoder in
        eval mode; returns the per-token log-probs ``[B * k, T]`` of those sequences, with
        gradients, then the sequences and the baseline sequences. Both passes run inside this
        ``forward`` so DDP sees one forward per step.
        """
        memories = self.encode(images)
        if decode is None:
            if tokens is None:
                raise ValueError("tokens are needed for teacher forcing")
            log_probs, _ = self.decoder(tokens, memories, captions_per_memory=captions_per_image)
            return log_probs
        was_training = self.decoder.training
        self.decoder.eval()
        with torch.no_grad():
            sequences, baseline = decode(self, {k: v.detach() for k, v in memories.items()})
        self.decoder.train(was_training)
        b, k, t = sequences.shape
        flat = sequences.reshape(b * k, t)
        bos = torch.full((b * k, 1), self.bos_idx, dtype=flat.dtype, device=flat.device)
        inputs = torch.cat([bos, flat[:, :-1]], dim=1)
        log_probs, _ = self.decoder(inputs, memories, captions_per_memory=k)
        token_log_probs = log_probs.gather(-1, flat.unsqueeze(-1)).squeeze(-1)
        return token_log_probs, sequences, baseline

    def _ids(self) -> dict[str, int]:
        return {"bos_idx": self.bos_idx, "eos_idx": self.eos_idx, "pad_idx": self.pad_idx}

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        beam_size: int = 5,
        max_len: int = 20,
        length_penalty: float = 0.0,
        n_best: int = 1,
    ) -> DecodeOutput:
        """Caption images: greedy when ``beam_size == 1``, else beam search."""
        memories = self.encode(images)
        if beam_size == 1:
            return greedy_decode(self.decoder, memories, max_len, **self._ids())
        return beam_search(
            self.decoder,
            memories,
            beam_size,
            max_len,
            length_penalty=length_penalty,
            n_best=n_best,
            **self._ids(),
        )
