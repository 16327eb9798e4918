"""Today's (pre-``decode.*`` controls) HeriCap searches, frozen verbatim from ``main`` at commit
5dc8746 (``hericap/models/decoding.py``): the reference that the library's searches with every
control left at its default must equal token for token and log-prob for log-prob
(``tests/test_decoding_controls.py``). Never edit this file to follow the library."""

from __future__ import annotations

import torch

from hericap.models.decoding import DecodeOutput, Masks, Memories


def _never_words(log_probs: torch.Tensor, bos_idx: int, pad_idx: int) -> torch.Tensor:
    """``log_probs`` with ``<bos>`` and ``<pad>`` ruled out: they are never generated words.

    The log-probs of the tokens that can be chosen are unchanged (not renormalised), so the
    scores reported equal the model's own teacher-forced log-probs of the sequence.
    """
    out = log_probs.clone()
    out[..., bos_idx] = float("-inf")
    out[..., pad_idx] = float("-inf")
    return out


def _batch_size(memories: Memories) -> int:
    return next(iter(memories.values())).shape[0]


@torch.no_grad()
def greedy_decode(
    decoder,
    memories: Memories,
    max_len: int,
    bos_idx: int,
    eos_idx: int,
    pad_idx: int,
    memory_masks: Masks = None,
) -> DecodeOutput:
    """Arg-max decoding of at most ``max_len`` words (then ``<eos>`` is forced)."""
    return _sequential_decode(
        decoder,
        memories,
        max_len,
        bos_idx,
        eos_idx,
        pad_idx,
        sample=False,
        temperature=1.0,
        num_samples=1,
        memory_masks=memory_masks,
    )


def sample_decode(
    decoder,
    memories: Memories,
    max_len: int,
    bos_idx: int,
    eos_idx: int,
    pad_idx: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    memory_masks: Masks = None,
) -> DecodeOutput:
    """Multinomial sampling of ``num_samples`` captions per image (SCST).

    Runs with gradients enabled when the caller has them on, so log-probs can be trained on.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    return _sequential_decode(
        decoder,
        memories,
        max_len,
        bos_idx,
        eos_idx,
        pad_idx,
        sample=True,
        temperature=temperature,
        num_samples=num_samples,
        generator=generator,
        memory_masks=memory_masks,
    )


def _sequential_decode(
    decoder,
    memories,
    max_len,
    bos_idx,
    eos_idx,
    pad_idx,
    sample,
    temperature,
    num_samples,
    generator=None,
    memory_masks=None,
) -> DecodeOutput:
    b = _batch_size(memories)
    n = b * num_samples
    device = next(iter(memories.values())).device
    cache = decoder.init_cache()
    last = torch.full((n,), bos_idx, dtype=torch.long, device=device)
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    tokens, logps = [], []
    for t in range(max_len + 1):
        logp, _ = decoder.step(
            last, memories, cache, t, captions_per_memory=num_samples, memory_masks=memory_masks
        )
        logp = _never_words(logp, bos_idx, pad_idx)
        if t == max_len:  # out of words: end here
            choice = torch.full_like(last, eos_idx)
        elif sample:
            probs = (logp.detach() / temperature).softmax(-1)
            choice = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            choice = logp.argmax(-1)
        choice = torch.where(finished, torch.full_like(choice, pad_idx), choice)
        step_logp = logp.gather(1, choice[:, None]).squeeze(1)
        logps.append(torch.where(finished, torch.zeros_like(step_logp), step_logp))
        tokens.append(choice)
        finished = finished | (choice == eos_idx)
        last = choice
        if bool(finished.all()):
            break
    seq = torch.stack(tokens, dim=1)
    lengths = (seq != pad_idx).sum(1)
    per_token = torch.stack(logps, dim=1)
    return DecodeOutput(
        tokens=seq.view(b, num_samples, -1),
        log_probs=per_token.sum(1).view(b, num_samples),
        lengths=lengths.view(b, num_samples),
        token_log_probs=per_token.view(b, num_samples, -1),
    )


@torch.no_grad()
def beam_search(
    decoder,
    memories: Memories,
    beam_size: int,
    max_len: int,
    bos_idx: int,
    eos_idx: int,
    pad_idx: int,
    length_penalty: float = 0.0,
    n_best: int = 1,
    memory_masks: Masks = None,
) -> DecodeOutput:
    """Batched beam search over the decoder's cache.

    Args:
        beam_size: beams per image.
        max_len: words at most; ``<eos>`` is forced after them.
        length_penalty: final ranking uses ``log_prob / length ** length_penalty`` (0: plain
            log-prob, the GRIT/M2 setting).
        n_best: beams returned per image, best first (``<= beam_size``).

    A finished beam stays finished: its only continuation is padding at no cost.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best} must be in [1, beam_size={beam_size}]")
    b, k = _batch_size(memories), beam_size
    device = next(iter(memories.values())).device
    cache = decoder.init_cache()
    last = torch.full((b * k,), bos_idx, dtype=torch.long, device=device)
    scores = torch.full((b, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = torch.zeros(b, k, dtype=torch.bool, device=device)
    seqs = torch.empty(b, k, 0, dtype=torch.long, device=device)
    step_logps = torch.empty(b, k, 0, device=device)
    offsets = (torch.arange(b, device=device) * k)[:, None]
    for t in range(max_len + 1):
        logp, _ = decoder.step(
            last, memories, cache, t, captions_per_memory=k, memory_masks=memory_masks
        )
        v = logp.shape[-1]
        logp = _never_words(logp, bos_idx, pad_idx).view(b, k, v)
        if t == max_len:
            forced = torch.full_like(logp, float("-inf"))
            forced[..., eos_idx] = logp[..., eos_idx]
            logp = forced
        done = torch.full_like(logp, float("-inf"))
        done[..., pad_idx] = 0.0
        logp = torch.where(finished[..., None], done, logp)
        top = (scores[..., None] + logp).view(b, k * v).topk(k, dim=-1)
        beam_idx, word = top.indices // v, top.indices % v
        chosen = logp.view(b, k * v).gather(1, top.indices)
        scores = top.values
        seqs = torch.cat(
            [seqs.gather(1, beam_idx[..., None].expand(-1, -1, seqs.shape[2])), word[..., None]],
            dim=2,
        )
        step_logps = torch.cat(
            [
                step_logps.gather(1, beam_idx[..., None].expand(-1, -1, step_logps.shape[2])),
                chosen[..., None],
            ],
            dim=2,
        )
        finished = finished.gather(1, beam_idx) | (word == eos_idx)
        decoder.reorder_cache(cache, (offsets + beam_idx).view(-1))
        last = word.view(-1)
        if bool(finished.all()):
            break
    lengths = (seqs != pad_idx).sum(-1)
    ranking = scores / lengths.clamp(min=1).float() ** length_penalty if length_penalty else scores
    order = ranking.argsort(dim=1, descending=True)[:, :n_best]
    return DecodeOutput(
        tokens=seqs.gather(1, order[..., None].expand(-1, -1, seqs.shape[2])),
        log_probs=scores.gather(1, order),
        lengths=lengths.gather(1, order),
        token_log_probs=step_logps.gather(1, order[..., None].expand(-1, -1, seqs.shape[2])),
    )
