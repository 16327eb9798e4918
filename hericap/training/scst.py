"""Self-critical sequence training (SCST; Rennie et al., CVPR 2017) with a CIDEr-D reward.

The reward is :class:`~hericap.evaluation.cider.CiderD` with document frequencies from the
training references, computed once; decoded token ids are scored directly (no text round trip,
no JVM). Whether ``<eos>`` is part of the reward string matters (leaving it out rewards truncated
captions; Gu et al., "SacreEOS", 2023): it is included by default, and the choice is recorded
with every score a run reports.

Baselines (``optimizer.sc_baseline``):

* ``beam_mean``: beam search with ``k`` beams; baseline = the mean reward of the image's beams
  (GRIT / M2 Transformer default, k = 5);
* ``leave_one_out``: ``k`` sampled captions; baseline = the mean reward of the other ``k - 1``
  (PureT);
* ``greedy``: ``k`` sampled captions; baseline = the reward of the greedy caption (Rennie et al.).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from hericap.config.schema import SCST_BASELINES
from hericap.data.ptb import ptb_tokenize
from hericap.data.text import Vocabulary
from hericap.evaluation.cider import CiderD, drop_empty_words
from hericap.models.decoding import DecodeControls, beam_search, greedy_decode, sample_decode

__all__ = [
    "SCST_BASELINES",
    "CiderReward",
    "advantages",
    "make_scst_decoder",
    "scst_loss",
    "scst_step",
]

EOS_WORD = "<eos>"


class CiderReward:
    """CIDEr-D of decoded token ids against the training references.

    Args:
        references: ``{image_id: [raw caption, ...]}`` of the training split; PTB-tokenised here.
        vocab: the model's vocabulary (to map token ids to words).
        include_eos: append ``<eos>`` to every reference and keep the generated ``<eos>``.
    """

    def __init__(
        self,
        references: Mapping[str, Sequence[str]],
        vocab: Vocabulary,
        include_eos: bool = True,
    ) -> None:
        suffix = f" {EOS_WORD}" if include_eos else ""
        self.include_eos = include_eos
        self.cider = CiderD(
            {k: [ptb_tokenize(c) + suffix for c in v] for k, v in references.items()}
        )
        table = self.cider.vocab_table(vocab.itos)
        table[vocab.pad_idx] = 0
        table[vocab.bos_idx] = 0
        table[vocab.eos_idx] = self.cider.word_ids(EOS_WORD)[0] if include_eos else 0
        self._table = table
        self._eos_idx = vocab.eos_idx

    def __call__(self, image_ids: Sequence[str], tokens: torch.Tensor | np.ndarray) -> np.ndarray:
        """Rewards of ``tokens [N, T]`` (model ids: words, ``<eos>``, padding), one per row."""
        tokens = torch.as_tensor(tokens).cpu()
        is_eos = (tokens == self._eos_idx).long()
        after_eos = (is_eos.cumsum(dim=1) - is_eos).numpy() > 0  # padding, whatever it holds
        ids = self._table[tokens.numpy()]
        ids[after_eos] = 0
        return self.cider.score_tokens(image_ids, drop_empty_words(ids))


def advantages(
    rewards: np.ndarray, baseline: str, greedy_rewards: np.ndarray | None = None
) -> np.ndarray:
    """``rewards [B, k]`` minus the baseline of ``baseline`` kind (see module docstring)."""
    if baseline not in SCST_BASELINES:
        raise ValueError(f"unknown SCST baseline {baseline!r}; known: {list(SCST_BASELINES)}")
    k = rewards.shape[1]
    if baseline == "beam_mean":
        return rewards - rewards.mean(axis=1, keepdims=True)
    if baseline == "leave_one_out":
        if k < 2:
            raise ValueError("leave_one_out needs at least 2 samples per image")
        return rewards - (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)
    if greedy_rewards is None:
        raise ValueError("the greedy baseline needs the greedy captions' rewards")
    return rewards - greedy_rewards.reshape(-1, 1)


def scst_loss(
    token_log_probs: torch.Tensor, tokens: torch.Tensor, eos_idx: int, adv: torch.Tensor
) -> torch.Tensor:
    """Policy-gradient loss: ``-(advantage * mean token log-prob)``, each sequence's log-prob
    normalised by its length (words and ``<eos>``).

    Args:
        token_log_probs: ``[N, T]`` log-probs of the decoded tokens.
        tokens: ``[N, T]`` the decoded tokens (words, ``<eos>``, padding).
        adv: ``[N]`` advantages.
    """
    is_eos = tokens == eos_idx
    # positions up to and including the first <eos>
    mask = ((is_eos.long().cumsum(dim=1) - is_eos.long()) == 0).float()
    seq_lp = (token_log_probs * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return -(adv.to(seq_lp.dtype) * seq_lp).mean()


def make_scst_decoder(
    baseline: str,
    num_sequences: int,
    max_len: int,
    bos_idx: int,
    eos_idx: int,
    pad_idx: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]]:
    """The decoding step of SCST for :meth:`Captioner.forward`'s ``decode`` argument: returns
    ``tokens [B, k, T]`` to train on and, for the greedy baseline, ``greedy tokens [B, 1, T]``.

    The sampling baselines (``leave_one_out``, ``greedy``) draw among the ``top_k`` likeliest
    words and the nucleus of mass ``top_p`` (``decode.top_k`` / ``decode.top_p``; 0 and 1: every
    word); the beams of ``beam_mean`` and the greedy baseline's caption are not affected.
    """
    if baseline not in SCST_BASELINES:
        raise ValueError(f"unknown SCST baseline {baseline!r}; known: {list(SCST_BASELINES)}")
    ids = {"bos_idx": bos_idx, "eos_idx": eos_idx, "pad_idx": pad_idx}
    sampling = DecodeControls(top_k=top_k, top_p=top_p)
    sampling.validate()

    def decode(model, memories, memory_masks=None):
        decoder = model.decoder
        masks = {"memory_masks": memory_masks, **ids}
        if baseline == "beam_mean":
            out = beam_search(
                decoder, memories, num_sequences, max_len, n_best=num_sequences, **masks
            )
            return out.tokens, None
        out = sample_decode(
            decoder,
            memories,
            max_len,
            num_samples=num_sequences,
            temperature=temperature,
            controls=sampling,
            **masks,
        )
        if baseline == "greedy":
            return out.tokens, greedy_decode(decoder, memories, max_len, **masks).tokens
        return out.tokens, None

    return decode


def scst_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    image_ids: np.ndarray,
    reward: CiderReward,
    decode,
    baseline: str,
    eos_idx: int,
    image_hw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """One SCST loss: decode (no gradients), reward, baseline, policy-gradient loss.

    ``model`` is the (possibly DDP-wrapped) captioner; ``decode`` comes from
    :func:`make_scst_decoder`; ``image_hw`` the images' real sizes in a padded batch. Returns
    the loss and the batch's mean reward.
    """
    token_log_probs, sequences, greedy = model(images, decode=decode, image_hw=image_hw)
    b, k, t = sequences.shape
    flat = sequences.reshape(b * k, t)
    ids = [str(i) for i in image_ids]
    rewards = reward([i for i in ids for _ in range(k)], flat).reshape(b, k)
    greedy_rewards = reward(ids, greedy.reshape(b, -1)) if greedy is not None else None
    adv = torch.as_tensor(advantages(rewards, baseline, greedy_rewards).reshape(-1))
    loss = scst_loss(token_log_probs, flat, eos_idx, adv.to(token_log_probs.device))
    return loss, float(rewards.mean())
