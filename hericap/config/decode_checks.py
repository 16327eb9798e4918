"""The checks of the decoding controls (``decode.*``), shared by the config schema (at load) and
by the searches (options given at run time: ``hericap caption``, ``serve``); torch-free.

Each error names the ``decode.*`` key (the CLI option of the same name) and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["SEARCH_CONTROLS", "check_decode_controls"]

# The controls that change a beam search (what the research beam search cannot do).
SEARCH_CONTROLS = (
    "alpha",
    "length_penalty",
    "no_repeat_ngram_size",
    "min_len",
    "beam_groups",
    "diversity_strength",
)


def check_decode_controls(
    *,
    alpha: float,
    length_penalty: float,
    no_repeat_ngram_size: int,
    min_len: int,
    beam_groups: int,
    diversity_strength: float,
    top_k: int,
    top_p: float,
    max_len: int | None = None,
    beam_sizes: Iterable[int] = (),
) -> None:
    """Raises ``ValueError`` for a control out of range, two length penalties at once, a
    ``min_len`` above ``max_len``, or a beam size (``beam_sizes``, 1 = greedy excepted) that
    ``beam_groups`` does not divide."""
    if alpha < 0 or length_penalty < 0:
        raise ValueError(
            f"decode.alpha={alpha} and decode.length_penalty={length_penalty} must be >= 0 "
            "(0: off; GNMT's alpha is typically 0.6-1.0)"
        )
    if alpha and length_penalty:
        raise ValueError(
            f"decode.alpha={alpha} (GNMT, ((5 + length) / 6) ** alpha, during the search) and "
            f"decode.length_penalty={length_penalty} (length ** p, final ranking only) are two "
            "length penalties: set one of them to 0"
        )
    if no_repeat_ngram_size < 0 or min_len < 0:
        raise ValueError(
            f"decode.no_repeat_ngram_size={no_repeat_ngram_size} and decode.min_len={min_len} "
            "must be >= 0 (0: off)"
        )
    if max_len is not None and (max_len < 1 or min_len > max_len):
        raise ValueError(
            f"decode.max_len={max_len} must be >= 1 and decode.min_len={min_len} at most that"
        )
    _check_groups(beam_groups, diversity_strength, beam_sizes)
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"decode.top_k={top_k} must be >= 0 (0: off) and decode.top_p={top_p} in (0, 1] "
            "(1: off)"
        )


def _check_groups(groups: int, strength: float, beam_sizes: Iterable[int]) -> None:
    if groups < 1 or strength < 0:
        raise ValueError(
            f"decode.beam_groups={groups} must be >= 1 and decode.diversity_strength={strength} "
            ">= 0 (1 group: plain beam search)"
        )
    if strength and groups == 1:
        raise ValueError(
            f"decode.diversity_strength={strength} only acts between groups of beams: set "
            "decode.beam_groups >= 2 (diverse beam search), or the strength to 0"
        )
    for size in beam_sizes:
        if size > 1 and size % groups:
            raise ValueError(
                f"decode.beam_groups={groups} must divide the beam size {size} (each group "
                f"keeps beam_size / beam_groups beams): use a beam size that is a multiple of "
                f"{groups}, or fewer groups"
            )
