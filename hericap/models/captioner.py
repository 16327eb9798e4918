"""The captioning model: extractor -> sub-encoders -> hierarchical decoder.

Only the grid branch is built so far; the region (Deformable DETR) and global (relation-aware
attention) sub-encoders plug in as further memories named ``region`` and ``global``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hericap.models.decoder import HierarchicalDecoder
from hericap.models.decoding import DecodeOutput, Memories, beam_search, greedy_decode
from hericap.models.encoders import GridEncoder, SwinExtractor

__all__ = ["Captioner"]


class Captioner(nn.Module):
    """Image captioner.

    Args:
        extractor: backbone returning NHWC feature maps.
        grid_encoder: grid sub-encoder over the last map.
        decoder: hierarchical decoder over the memories.
        bos_idx: begin-of-sentence token; ``eos_idx`` and ``pad_idx`` likewise.
    """

    def __init__(
        self,
        extractor: SwinExtractor,
        grid_encoder: GridEncoder,
        decoder: HierarchicalDecoder,
        bos_idx: int = 2,
        eos_idx: int = 3,
        pad_idx: int = 1,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.grid_encoder = grid_encoder
        self.decoder = decoder
        self.bos_idx, self.eos_idx, self.pad_idx = bos_idx, eos_idx, pad_idx

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images [B, 3, H, W]`` (normalised) -> memories ``{"grid": [B, N, D]}``."""
        maps = self.extractor(images)
        return {"grid": self.grid_encoder(maps[-1])}

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
