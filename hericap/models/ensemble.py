"""Log-prob-averaging ensembles of captioners (``hericap eval exp.checkpoint=A,B``).

At every decoding step each member runs its own decoder, with its own key/value cache, over its
own memories of the image, and the ensemble's next-word log-probs are the mean of the members'
log-probs (a product of experts, as in the ensembles of M2 Transformer and GRIT's evaluations);
beam search, greedy decoding and sampling then run over that mean exactly as over one model's
(:func:`~hericap.models.decoding.decode_memories`), every ``decode.*`` control included. An
ensemble of one is its member.

Members must read the same images the same way and share the vocabulary (the checkpoint loader,
:func:`hericap.checkpoint.ensemble.load_ensemble`, checks the vocabulary and the resize rule;
:class:`CaptionEnsemble` checks the rest).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from hericap.models.captioner import Captioner
from hericap.models.decoding import DecodeControls, DecodeOutput, Masks, Memories, decode_memories

__all__ = ["CaptionEnsemble", "EnsembleDecoder"]

logger = logging.getLogger(__name__)

# Member i's memory "grid" travels as "<i>/grid" in the ensemble's one memory dict.
_SEPARATOR = "/"


def _own(tensors: Masks, member: int) -> Masks:
    """Member ``member``'s entries of an ensemble memory (or mask) dict, under their own names."""
    if tensors is None:
        return None
    prefix = f"{member}{_SEPARATOR}"
    mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return mine or None


class EnsembleDecoder:
    """The decoder interface (``init_cache`` / ``step`` / ``reorder_cache``) over several
    decoders: member ``i`` reads the memories named ``"<i>/<name>"``; a step returns the mean of
    the members' log-probs (and no attention weights).

    Args:
        decoders: the members' decoders, sharing one vocabulary.
    """

    def __init__(self, decoders: Sequence[torch.nn.Module]) -> None:
        if not decoders:
            raise ValueError("an ensemble needs at least one decoder")
        self.decoders = list(decoders)

    def init_cache(self) -> list:
        return [d.init_cache() for d in self.decoders]

    def step(
        self,
        tokens: torch.Tensor,
        memories: Memories,
        cache: list,
        position: int,
        need_weights: bool = False,
        captions_per_memory: int = 1,
        memory_masks: Masks = None,
    ) -> tuple[torch.Tensor, list]:
        """The members' step log-probs ``[N, V]``, averaged."""
        steps = [
            decoder.step(
                tokens,
                _own(memories, i),
                cache[i],
                position,
                captions_per_memory=captions_per_memory,
                memory_masks=_own(memory_masks, i),
            )[0]
            for i, decoder in enumerate(self.decoders)
        ]
        if len(steps) == 1:
            return steps[0], []
        return torch.stack(steps).mean(0), []

    def reorder_cache(self, cache: list, index: torch.Tensor) -> None:
        for decoder, member_cache in zip(self.decoders, cache, strict=True):
            decoder.reorder_cache(member_cache, index)


def _check_members(members: Sequence[Captioner]) -> None:
    """Raises ``ValueError`` naming what differs between members that must agree."""
    checks = {
        "special tokens (<bos>, <eos>, <pad>)": lambda m: m.token_ids,
        "vocabulary size": lambda m: m.decoder.out.out_features,
        "padding rule (model.padding)": lambda m: m.padding,
        "beam search rule (model.beam_search)": lambda m: m.search,
        "input multiple": lambda m: m.input_multiple,
    }
    for what, value in checks.items():
        values = [value(m) for m in members]
        if any(v != values[0] for v in values[1:]):
            raise ValueError(
                f"ensemble members differ in their {what}: {values}; an ensemble needs members "
                "that read images and words alike (checkpoints of one model set-up)"
            )


class CaptionEnsemble:
    """Several captioners decoded as one model (log-prob averaging; see the module docstring).

    It offers what the captioning paths use of a :class:`Captioner`: ``generate``,
    ``input_multiple``, ``zero_padding``, ``search``, ``token_ids`` and ``eval``.

    Args:
        members: the captioners; they must share special tokens, vocabulary size, padding and
            search rules.
    """

    def __init__(self, members: Sequence[Captioner]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        _check_members(members)
        self.members = list(members)
        self.decoder = EnsembleDecoder([m.decoder for m in members])

    @property
    def input_multiple(self) -> int:
        return self.members[0].input_multiple

    @property
    def zero_padding(self) -> bool:
        return self.members[0].zero_padding

    @property
    def search(self) -> str:
        return self.members[0].search

    @property
    def token_ids(self) -> tuple[int, int, int]:
        return self.members[0].token_ids

    def eval(self) -> CaptionEnsemble:
        for m in self.members:
            m.eval()
        return self

    def encode(
        self, images: torch.Tensor, image_hw: torch.Tensor | None = None
    ) -> tuple[Memories, Masks]:
        """Every member's memories (and padding masks) of ``images``, named ``"<i>/<name>"``."""
        memories: Memories = {}
        masks: dict[str, torch.Tensor] = {}
        for i, member in enumerate(self.members):
            encoded = member.encode_all(images, image_hw)
            memories.update({f"{i}{_SEPARATOR}{k}": v for k, v in encoded.memories.items()})
            for k, v in (encoded.masks or {}).items():
                masks[f"{i}{_SEPARATOR}{k}"] = v
        return memories, masks or None

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
        """As :meth:`Captioner.generate`, over the mean of the members' log-probs."""
        memories, masks = self.encode(images, image_hw)
        return decode_memories(
            self.decoder,
            memories,
            self.token_ids,
            search=self.search,
            beam_size=beam_size,
            max_len=max_len,
            n_best=n_best,
            memory_masks=masks,
            controls=controls,
            sample=sample,
            generator=generator,
        )
