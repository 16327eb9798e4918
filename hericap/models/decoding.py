"""Caption decoding over the decoder's key/value cache: greedy, beam search and sampling, with
the decoding controls of ``decode.*`` (:class:`DecodeControls`; ``docs/decoding.md``).

All functions take a decoder with ``init_cache``/``step``/``reorder_cache`` (see
:class:`~hericap.models.decoder.HierarchicalDecoder`, or an ensemble of them,
:class:`~hericap.models.ensemble.EnsembleDecoder`) and already-encoded memories (with their
padding masks, if any), so the image encoder runs once per image whatever the decoding. The
memories are never repeated per beam or sample: an image's beams are consecutive rows that the
decoder folds into one cross-attention query block over the image's memory
(``captions_per_memory``).

The controls (every one off by default, when the searches are exactly those of before them):

* ``alpha``: GNMT's length penalty (Wu et al., 2016, "Google's Neural Machine Translation
  System", eq. 14): candidates are compared by ``log_prob / ((5 + length) / 6) ** alpha``,
  during the search (a finished beam against the longer beams still growing) and in the final
  ranking. ``length_penalty`` is the older final-ranking-only ``log_prob / length ** p``.
* ``no_repeat_ngram_size``: a word that would repeat an n-gram of the caption is ruled out.
* ``min_len``: ``<eos>`` is ruled out before that many words.
* ``beam_groups`` / ``diversity_strength``: diverse beam search (Vijayakumar et al., AAAI 2018,
  "Diverse Beam Search"): the beams form groups searched in turn at each step, a word's log-prob
  in a group lowered by ``diversity_strength`` per beam of an earlier group that chose it at that
  step (Hamming diversity). As in the paper's and fairseq's implementations a group's running
  score includes its penalties; the returned ``log_probs`` and the final ranking are the model's.
* ``top_k`` / ``top_p``: sampling among the k likeliest words / the smallest set of likeliest
  words whose probability reaches p (nucleus sampling, Holtzman et al., ICLR 2020).

Ruled-out words get -inf; the log-probs of the words that remain are unchanged (never
renormalised), so the scores reported are the model's own teacher-forced log-probs. A row whose
every word is ruled out keeps ``<eos>``.

:func:`research_beam_search` is the research code's beam search (GRIT / HierCap
``Transformer.iter``), for the research flavours; see its docstring for how it differs. It has
no controls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hericap.config.decode_checks import SEARCH_CONTROLS, check_decode_controls

__all__ = [
    "SEARCHES",
    "DecodeControls",
    "DecodeOutput",
    "beam_search",
    "check_search_controls",
    "decode_memories",
    "greedy_decode",
    "research_beam_search",
    "sample_decode",
]

Memories = dict[str, torch.Tensor]
Masks = dict[str, torch.Tensor] | None
# Beam search rules (``model.beam_search``).
SEARCHES = ("hericap", "research")
# The research beam search's score for every continuation of a finished beam but <unk>
# (``old_seq_logprob[:, :, 1:] = -999``).
RESEARCH_FINISHED_SCORE = -999.0
# GNMT's length penalty is ((GNMT_BASE + length) / (GNMT_BASE + 1)) ** alpha (Wu et al., 2016).
GNMT_BASE = 5.0
NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodeControls:
    """The decoding controls (the ``decode.*`` keys of the same names; all off by default).

    Attributes:
        alpha: GNMT length penalty, during the search and in the final ranking (0: off).
        length_penalty: final ranking by ``log_prob / length ** length_penalty`` (0: off).
        no_repeat_ngram_size: no n-gram of this many words twice in a caption (0: off).
        min_len: ``<eos>`` ruled out before this many words (0: off).
        beam_groups: diverse beam search groups; must divide the beam size (1: plain search).
        diversity_strength: Hamming diversity penalty between groups (0: none).
        top_k: sampling among the k likeliest words (0: all).
        top_p: nucleus sampling mass (1: all words).
    """

    alpha: float = 0.0
    length_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    min_len: int = 0
    beam_groups: int = 1
    diversity_strength: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self, beam_size: int | None = None, max_len: int | None = None) -> None:
        """Raises ``ValueError`` naming the ``decode.*`` key to change (``beam_size``: the one
        the search runs with, checked against ``beam_groups``)."""
        sizes = () if beam_size is None else (beam_size,)
        check_decode_controls(**asdict(self), max_len=max_len, beam_sizes=sizes)

    def as_dict(self) -> dict[str, float | int]:
        """Every control and its value (what score reports record)."""
        return asdict(self)

    def search_changes(self) -> list[str]:
        """The controls away from their defaults that change a beam search."""
        default = DecodeControls()
        return [k for k in SEARCH_CONTROLS if getattr(self, k) != getattr(default, k)]

    def describe(self, beam_size: int) -> str:
        """``greedy`` or ``beam N``, then the controls away from their defaults."""
        default = asdict(DecodeControls())
        changed = [f"{k}={v}" for k, v in asdict(self).items() if v != default[k]]
        return ", ".join(["greedy" if beam_size == 1 else f"beam {beam_size}", *changed])


@dataclass
class DecodeOutput:
    """``tokens [B, n, T]`` (words then ``<eos>``, then padding or, for the research search,
    ``<unk>``), ``log_probs [B, n]`` (sum over the tokens, ``<eos>`` included), ``lengths
    [B, n]`` (tokens incl. ``<eos>``) and ``token_log_probs [B, n, T]`` (each token's own
    log-prob; 0 after ``<eos>``)."""

    tokens: torch.Tensor
    log_probs: torch.Tensor
    lengths: torch.Tensor
    token_log_probs: torch.Tensor | None = None


def _never_words(log_probs: torch.Tensor, bos_idx: int, pad_idx: int) -> torch.Tensor:
    """``log_probs`` with ``<bos>`` and ``<pad>`` ruled out: they are never generated words.

    The log-probs of the tokens that can be chosen are unchanged (not renormalised), so the
    scores reported equal the model's own teacher-forced log-probs of the sequence.
    """
    out = log_probs.clone()
    out[..., bos_idx] = float("-inf")
    out[..., pad_idx] = float("-inf")
    return out


def _repeated_ngram_words(words: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """``bool [N, V]``: the words that would complete, after ``words [N, t]``, an n-gram that
    the row already holds."""
    rows, t = words.shape
    banned = torch.zeros(rows, vocab_size, device=words.device)
    if t < n:
        return banned.bool()
    windows = words.unfold(1, n, 1)  # every n-gram so far: [N, t - n + 1, n]
    prefix = words[:, t - n + 1 :]  # the last n - 1 words
    same_start = (windows[..., :-1] == prefix[:, None, :]).all(-1)
    # scatter_add: several n-grams may end in one word, some matching and some not
    return banned.scatter_add_(1, windows[..., -1], same_start.float()) > 0


def _constrain(
    logp: torch.Tensor, words: torch.Tensor, step: int, eos_idx: int, controls: DecodeControls
) -> torch.Tensor:
    """``logp [N, V]`` of the word after ``words [N, step]`` with what ``min_len`` and
    ``no_repeat_ngram_size`` rule out at -inf; a row left without any word keeps ``<eos>``."""
    n = controls.no_repeat_ngram_size
    if step >= controls.min_len and not n:
        return logp
    if n:
        ban = _repeated_ngram_words(words, n, logp.shape[-1])
    else:
        ban = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
    if step < controls.min_len:
        ban[:, eos_idx] = True
    nothing_left = (ban | torch.isneginf(logp)).all(-1)
    ban[:, eos_idx] &= ~nothing_left
    return logp.masked_fill(ban, NEG_INF)


def _sampling_probs(logp: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """The distribution sampled from: ``softmax(logp / temperature)`` over the ``top_k``
    likeliest words, then over the nucleus of mass ``top_p`` (the likeliest word always stays)."""
    logits = logp.detach() / temperature
    if top_k and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, NEG_INF)
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(-1)
        # a word goes when the likelier words before it already reach top_p
        drop_ranked = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_ranked).scatter_(1, order, drop_ranked)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits.softmax(-1)


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
    controls: DecodeControls | None = None,
) -> DecodeOutput:
    """Arg-max decoding of at most ``max_len`` words (then ``<eos>`` is forced); of the
    ``controls``, ``min_len`` and ``no_repeat_ngram_size`` apply."""
    return _sequential_decode(
        decoder,
        memories,
        max_len,
        (bos_idx, eos_idx, pad_idx),
        sample=False,
        temperature=1.0,
        num_samples=1,
        memory_masks=memory_masks,
        controls=controls or DecodeControls(),
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
    controls: DecodeControls | None = None,
) -> DecodeOutput:
    """Multinomial sampling of ``num_samples`` captions per image (SCST, ``caption --sample``);
    of the ``controls``, ``top_k``, ``top_p``, ``min_len`` and ``no_repeat_ngram_size`` apply.

    Runs with gradients enabled when the caller has them on, so log-probs can be trained on. The
    log-probs returned are the model's (not those of the truncated distribution sampled from).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    return _sequential_decode(
        decoder,
        memories,
        max_len,
        (bos_idx, eos_idx, pad_idx),
        sample=True,
        temperature=temperature,
        num_samples=num_samples,
        generator=generator,
        memory_masks=memory_masks,
        controls=controls or DecodeControls(),
    )


def _choose(logp, t, max_len, eos_idx, sample, temperature, controls, generator):
    """The next token of each row: ``<eos>`` when out of words, else sampled or arg-max."""
    if t == max_len:  # out of words: end here
        return torch.full(logp.shape[:1], eos_idx, dtype=torch.long, device=logp.device)
    if sample:
        probs = _sampling_probs(logp, temperature, controls.top_k, controls.top_p)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return logp.argmax(-1)


def _sequential_decode(
    decoder,
    memories,
    max_len,
    ids,
    sample,
    temperature,
    num_samples,
    generator=None,
    memory_masks=None,
    controls: DecodeControls | None = None,
) -> DecodeOutput:
    bos_idx, eos_idx, pad_idx = ids
    controls = controls or DecodeControls()
    controls.validate(max_len=max_len)
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
        ngrams = tokens and controls.no_repeat_ngram_size
        words = torch.stack(tokens, 1) if ngrams else last.new_empty(n, 0)
        logp = _constrain(logp, words, t, eos_idx, controls)
        choice = _choose(logp, t, max_len, eos_idx, sample, temperature, controls, generator)
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


def _gnmt(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's length penalty ``((5 + length) / 6) ** alpha``."""
    return ((GNMT_BASE + lengths.float()) / (GNMT_BASE + 1.0)) ** alpha


@dataclass
class _Beams:
    """The state of a batched beam search: per image ``k`` beams (``[B, k]`` and
    ``[B, k, t]``); ``scores`` are what the search ranks (with diverse beam search, the
    log-probs minus the diversity penalties), ``log_probs`` the model's."""

    seqs: torch.Tensor
    step_logps: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor
    finished: torch.Tensor
    last: torch.Tensor

    @classmethod
    def start(cls, b: int, k: int, groups: int, bos_idx: int, device) -> _Beams:
        scores = torch.full((b, k), float("-inf"), device=device)
        scores[:, :: k // groups] = 0.0  # a group's beams start identical: expand its first
        return cls(
            seqs=torch.empty(b, k, 0, dtype=torch.long, device=device),
            step_logps=torch.empty(b, k, 0, device=device),
            scores=scores,
            log_probs=scores.clone(),
            finished=torch.zeros(b, k, dtype=torch.bool, device=device),
            last=torch.full((b * k,), bos_idx, dtype=torch.long, device=device),
        )

    def advance(self, beam_idx, word, scores, logp, eos_idx: int) -> None:
        """Each new beam: the beam ``beam_idx`` it extends with ``word`` (``[B, k]``)."""
        b, k, v = logp.shape
        chosen = logp.view(b, k * v).gather(1, beam_idx * v + word)
        t = self.seqs.shape[2]
        self.seqs = torch.cat(
            [self.seqs.gather(1, beam_idx[..., None].expand(-1, -1, t)), word[..., None]], dim=2
        )
        self.step_logps = torch.cat(
            [self.step_logps.gather(1, beam_idx[..., None].expand(-1, -1, t)), chosen[..., None]],
            dim=2,
        )
        self.scores = scores
        self.log_probs = self.log_probs.gather(1, beam_idx) + chosen
        self.finished = self.finished.gather(1, beam_idx) | (word == eos_idx)
        self.last = word.view(-1)


def _beam_log_probs(logp, beams: _Beams, t, max_len, ids, controls) -> torch.Tensor:
    """The step's ``[B, k, V]`` log-probs with the rules of the search applied: no
    ``<bos>``/``<pad>``, the controls, ``<eos>`` forced after ``max_len`` words, a finished
    beam's only continuation ``<pad>`` at no cost."""
    bos_idx, eos_idx, pad_idx = ids
    b, k = beams.finished.shape
    logp = _never_words(logp, bos_idx, pad_idx)
    words = beams.seqs.reshape(b * k, beams.seqs.shape[2])
    logp = _constrain(logp, words, t, eos_idx, controls).view(b, k, -1)
    if t == max_len:
        forced = torch.full_like(logp, float("-inf"))
        forced[..., eos_idx] = logp[..., eos_idx]
        logp = forced
    done = torch.full_like(logp, float("-inf"))
    done[..., pad_idx] = 0.0
    return torch.where(beams.finished[..., None], done, logp)


def _select(logp, beams: _Beams, t: int, pad_idx: int, controls: DecodeControls):
    """The ``k`` new beams of each image, group by group: ``(beam extended [B, k], word [B, k],
    score [B, k])``."""
    b, k, v = logp.shape
    size = k // controls.beam_groups
    chosen_words = torch.zeros(b, v, device=logp.device)  # earlier groups' words, this step
    parts = []
    for start in range(0, k, size):
        group_logp = logp[:, start : start + size]
        if start and controls.diversity_strength:
            group_logp = group_logp - controls.diversity_strength * chosen_words[:, None, :]
        candidates = beams.scores[:, start : start + size, None] + group_logp
        rank = candidates
        if controls.alpha:  # growing beams reach t + 1 tokens; finished ones keep theirs
            length = (beams.seqs[:, start : start + size] != pad_idx).sum(-1)
            length = torch.where(beams.finished[:, start : start + size], length, t + 1)
            rank = candidates / _gnmt(length, controls.alpha)[..., None]
        top = rank.view(b, size * v).topk(size, dim=-1)
        score = top.values if rank is candidates else candidates.view(b, -1).gather(1, top.indices)
        word = top.indices % v
        parts.append((top.indices // v + start, word, score))
        if controls.diversity_strength:
            chosen_words.scatter_add_(1, word, (word != pad_idx).float())
    beam_idx, word, score = (torch.cat(p, dim=1) for p in zip(*parts, strict=True))
    return beam_idx, word, score


def _final_order(beams: _Beams, lengths: torch.Tensor, n_best: int, controls: DecodeControls):
    """The ``n_best`` beams of each image, best first, by the model's log-prob and the length
    penalty in use."""
    ranking = beams.log_probs
    if controls.alpha:
        ranking = ranking / _gnmt(lengths, controls.alpha)
    elif controls.length_penalty:
        ranking = ranking / lengths.clamp(min=1).float() ** controls.length_penalty
    return ranking.argsort(dim=1, descending=True)[:, :n_best]


@torch.no_grad()
def beam_search(
    decoder,
    memories: Memories,
    beam_size: int,
    max_len: int,
    bos_idx: int,
    eos_idx: int,
    pad_idx: int,
    n_best: int = 1,
    memory_masks: Masks = None,
    controls: DecodeControls | None = None,
) -> DecodeOutput:
    """Batched beam search over the decoder's cache.

    Args:
        beam_size: beams per image.
        max_len: words at most; ``<eos>`` is forced after them.
        n_best: beams returned per image, best first (``<= beam_size``).
        controls: the decoding controls (None: all off); see the module docstring.

    A finished beam stays finished: its only continuation is padding at no cost.
    """
    controls = controls or DecodeControls()
    controls.validate(beam_size, max_len)
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best} must be in [1, beam_size={beam_size}]")
    b, k = _batch_size(memories), beam_size
    device = next(iter(memories.values())).device
    ids = (bos_idx, eos_idx, pad_idx)
    cache = decoder.init_cache()
    beams = _Beams.start(b, k, controls.beam_groups, bos_idx, device)
    offsets = (torch.arange(b, device=device) * k)[:, None]
    for t in range(max_len + 1):
        logp, _ = decoder.step(
            beams.last, memories, cache, t, captions_per_memory=k, memory_masks=memory_masks
        )
        logp = _beam_log_probs(logp, beams, t, max_len, ids, controls)
        beam_idx, word, scores = _select(logp, beams, t, pad_idx, controls)
        beams.advance(beam_idx, word, scores, logp, eos_idx)
        decoder.reorder_cache(cache, (offsets + beam_idx).view(-1))
        if bool(beams.finished.all()):
            break
    lengths = (beams.seqs != pad_idx).sum(-1)
    order = _final_order(beams, lengths, n_best, controls)
    width = beams.seqs.shape[2]
    return DecodeOutput(
        tokens=beams.seqs.gather(1, order[..., None].expand(-1, -1, width)),
        log_probs=beams.log_probs.gather(1, order),
        lengths=lengths.gather(1, order),
        token_log_probs=beams.step_logps.gather(1, order[..., None].expand(-1, -1, width)),
    )


def check_search_controls(search: str, controls: DecodeControls) -> None:
    """Raises ``ValueError`` when ``controls`` change a beam search that has none (the research
    one, ``search="research"``)."""
    changed = controls.search_changes()
    if search == "research" and changed:
        raise ValueError(
            f"decode.{', decode.'.join(changed)}: the research beam search "
            "(model.beam_search=research) has no decoding controls; leave them at their "
            "defaults or use model.beam_search=hericap"
        )


def decode_memories(
    decoder,
    memories: Memories,
    ids: tuple[int, int, int],
    search: str = "hericap",
    beam_size: int = 5,
    max_len: int = 20,
    n_best: int = 1,
    memory_masks: Masks = None,
    controls: DecodeControls | None = None,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> DecodeOutput:
    """Decode encoded images the way ``search`` (``model.beam_search``) and the arguments ask:
    ``sample`` (``n_best`` samples per image, ``controls.top_k`` / ``top_p``), greedy when
    ``beam_size == 1``, else beam search (with the research rule: the research beam search,
    whatever the beam size). ``ids``: ``(bos, eos, pad)``."""
    controls = controls or DecodeControls()
    bos_idx, eos_idx, _ = ids
    common = {"memory_masks": memory_masks, "controls": controls}
    if sample:
        return sample_decode(
            decoder, memories, max_len, *ids, num_samples=n_best, generator=generator, **common
        )
    if search == "research":
        check_search_controls(search, controls)
        return research_beam_search(
            decoder, memories, beam_size, max_len, bos_idx, eos_idx, n_best, memory_masks
        )
    if beam_size == 1:
        return greedy_decode(decoder, memories, max_len, *ids, **common)
    return beam_search(decoder, memories, beam_size, max_len, *ids, n_best=n_best, **common)


@torch.no_grad()
def research_beam_search(
    decoder,
    memories: Memories,
    beam_size: int,
    max_len: int,
    bos_idx: int,
    eos_idx: int,
    n_best: int = 1,
    memory_masks: Masks = None,
) -> DecodeOutput:
    """The research code's beam search (GRIT / HierCap ``Transformer.forward`` with
    ``use_beam_search=True``), step for step.

    Unlike :func:`beam_search`: exactly ``max_len`` steps and no forced ``<eos>``; any word may
    be chosen (``<bos>`` and ``<pad>`` too); a beam that has emitted ``<eos>`` continues with
    ``<unk>`` (index 0) at log-prob 0, every other continuation of it scoring -999; candidates
    are ranked by a descending sort of the running sums, and the final beams too; no length
    normalisation.

    Returns ``tokens [B, n, max_len]`` and ``token_log_probs`` exactly as the research code
    returns them (``n = min(n_best, beam_size)``).
    """
    b, k = _batch_size(memories), beam_size
    device = next(iter(memories.values())).device
    cache = decoder.init_cache()
    last = torch.full((b,), bos_idx, dtype=torch.long, device=device)
    scores = torch.zeros(b, 1, 1, device=device)
    alive = torch.ones(b, k, 1, device=device)  # the research seq_mask
    seqs = torch.empty(b, k, 0, dtype=torch.long, device=device)
    step_logps = torch.empty(b, k, 0, device=device)
    for t in range(max_len):
        width = 1 if t == 0 else k
        logp, _ = decoder.step(
            last, memories, cache, t, captions_per_memory=width, memory_masks=memory_masks
        )
        logp = logp.view(b, width, -1)
        v = logp.shape[-1]
        candidates = scores + logp
        if t > 0:
            alive = alive * (last.view(b, k, 1) != eos_idx).float()
            logp = logp * alive
            finished = scores.expand_as(candidates).clone()
            finished[:, :, 1:] = RESEARCH_FINISHED_SCORE
            candidates = alive * candidates + finished * (1 - alive)
        ranked, index = torch.sort(candidates.view(b, width * v), -1, descending=True)
        ranked, index = ranked[:, :k], index[:, :k]
        beam = torch.div(index, v, rounding_mode="floor")
        word = index - beam * v
        if t == 0:  # every beam starts from the one <bos> row: k rows per image from now on
            decoder.reorder_cache(cache, torch.arange(b, device=device).repeat_interleave(k))
        else:
            offsets = (torch.arange(b, device=device) * k)[:, None]
            decoder.reorder_cache(cache, (offsets + beam).view(-1))
        scores = ranked[..., None]
        alive = alive.gather(1, beam[..., None]) if t > 0 else alive
        chosen = logp.gather(1, beam[..., None].expand(-1, -1, v)).gather(2, word[..., None])
        seqs = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, t)), word[..., None]], 2)
        step_logps = torch.cat(
            [step_logps.gather(1, beam[..., None].expand(-1, -1, t)), chosen], dim=2
        )
        last = word.view(-1)
    final, order = torch.sort(scores, 1, descending=True)
    n = min(n_best, k)
    tokens = seqs.gather(1, order.expand(-1, -1, max_len))[:, :n]
    per_token = step_logps.gather(1, order.expand(-1, -1, max_len))[:, :n]
    ends = (tokens == eos_idx).int()
    lengths = torch.where(ends.any(-1), ends.argmax(-1) + 1, torch.full_like(ends[..., 0], max_len))
    return DecodeOutput(
        tokens=tokens,
        log_probs=final[:, :n, 0],
        lengths=lengths,
        token_log_probs=per_token,
    )
