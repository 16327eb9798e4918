"""The decoding controls (``decode.*``) and log-prob-averaging ensembles.

Each control is shown on a toy decoder whose next-word distribution is a table of the words so
far, so the captions each setting must give are worked out by hand; with every control at its
default the searches equal today's (``decoding_reference.py``, frozen from ``main``) token for
token and log-prob for log-prob. No Ray, tiny models, seconds.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from decoding_reference import beam_search as ref_beam_search
from decoding_reference import greedy_decode as ref_greedy_decode
from decoding_reference import sample_decode as ref_sample_decode
from PIL import Image
from tiny_model import TINY_MODEL

from hericap.checkpoint import save_checkpoint
from hericap.config import load_config
from hericap.config.loader import ConfigError
from hericap.data.text import Vocabulary
from hericap.models import build_captioner
from hericap.models.builder import decode_controls
from hericap.models.decoding import (
    DecodeControls,
    beam_search,
    decode_memories,
    greedy_decode,
    sample_decode,
)
from hericap.models.ensemble import CaptionEnsemble

# The toy vocabulary: the four special tokens, then four words.
UNK, PAD, BOS, EOS, A, B, C, D = range(8)
V = 8
IDS = {"bos_idx": BOS, "eos_idx": EOS, "pad_idx": PAD}
# What every token a table does not name gets, before normalising.
REST = 1e-4
FIELDS = ("tokens", "log_probs", "lengths", "token_log_probs")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: tiny models decode faster so on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyDecoder:
    """The decoder interface over ``table(words) -> {token: probability}`` (``words``: the
    tokens after ``<bos>``), unnamed tokens at ``REST``, normalised; no cache but the words."""

    def __init__(self, table) -> None:
        self.table = table
        self._memo: dict[tuple[int, ...], torch.Tensor] = {}

    def log_probs(self, words: tuple[int, ...]) -> torch.Tensor:
        if words not in self._memo:
            p = torch.full((V,), REST)
            for token, prob in self.table(words).items():
                p[token] = prob
            self._memo[words] = (p / p.sum()).log()
        return self._memo[words]

    def lp(self, *words: int) -> float:
        """The model's log-prob of ``words`` (the last one given the others)."""
        return float(self.log_probs(tuple(words[:-1]))[words[-1]])

    def init_cache(self) -> dict:
        return {"words": None}

    def reorder_cache(self, cache: dict, index: torch.Tensor) -> None:
        cache["words"] = cache["words"].index_select(0, index)

    def step(self, tokens, memories, cache, position, captions_per_memory=1, memory_masks=None):
        words = (
            tokens[:, None]
            if cache["words"] is None
            else torch.cat([cache["words"], tokens[:, None]], dim=1)
        )
        cache["words"] = words
        return torch.stack([self.log_probs(tuple(w[1:].tolist())) for w in words]), []


def _images(n: int = 1) -> dict[str, torch.Tensor]:
    return {"grid": torch.zeros(n, 1, 1)}


def _words(row: torch.Tensor) -> list[int]:
    row = row.tolist()
    return row[: row.index(EOS)] if EOS in row else row


def _captions(out) -> list[list[int]]:
    return [_words(r) for r in out.tokens.reshape(-1, out.tokens.shape[-1])]


# ----------------------------------------------------------------- defaults reproduce today


def _tiny_captioner(seed: int, *overrides: str, vocab_size: int = 40):
    cfg = load_config(["preset=demo", *TINY_MODEL, *overrides])
    torch.manual_seed(seed)
    return build_captioner(cfg.model, vocab_size, image_size=64).eval()


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_control_at_its_default_gives_todays_searches_exactly(seed):
    """Beam search of every width and n-best, the old length penalty, greedy decoding and
    seeded sampling: tokens, lengths and log-probs bit for bit equal to the frozen reference,
    with the controls of the default config, none, or given explicitly."""
    model = _tiny_captioner(seed)
    mem = model.encode(torch.randn(3, 3, 64, 64))
    default = decode_controls(load_config([]).decode)
    assert default == DecodeControls()
    for k in (2, 3, 5):
        for controls in (None, default):
            got = beam_search(model.decoder, mem, k, 8, n_best=k, controls=controls, **IDS)
            assert _same(got, ref_beam_search(model.decoder, mem, k, 8, n_best=k, **IDS))
        old = ref_beam_search(model.decoder, mem, k, 8, length_penalty=0.7, n_best=2, **IDS)
        new = beam_search(
            model.decoder, mem, k, 8, n_best=2, controls=DecodeControls(length_penalty=0.7), **IDS
        )
        assert _same(new, old)
    assert _same(greedy_decode(model.decoder, mem, 8, controls=default, **IDS),
                 ref_greedy_decode(model.decoder, mem, 8, **IDS))  # fmt: skip
    drawn = [
        f(model.decoder, mem, 8, num_samples=4, generator=torch.Generator().manual_seed(3), **IDS)
        for f in (sample_decode, ref_sample_decode)
    ]
    assert _same(*drawn)
    # generate() dispatches to the same searches
    images = torch.randn(2, 3, 64, 64)
    via_generate = model.generate(images, beam_size=3, max_len=8, n_best=3, controls=default)
    mem2 = model.encode(images)
    assert _same(via_generate, ref_beam_search(model.decoder, mem2, 3, 8, n_best=3, **IDS))


# ----------------------------------------------------------------- one test per control


def _eos_or_a_b(words):
    """An empty caption is the likeliest single choice; "a b" is likelier per word."""
    table = {(): {EOS: 0.45, A: 0.55}, (A,): {B: 0.85, EOS: 0.15}, (A, B): {EOS: 0.85, B: 0.15}}
    return table.get(words, {EOS: 1.0})


def test_alpha_ranks_by_the_gnmt_normalised_log_prob():
    toy = ToyDecoder(_eos_or_a_b)
    plain = beam_search(toy, _images(), 2, 5, n_best=2, **IDS)
    gnmt = beam_search(toy, _images(), 2, 5, n_best=2, controls=DecodeControls(alpha=1.0), **IDS)
    empty, a_b = toy.lp(EOS), toy.lp(A) + toy.lp(A, B) + toy.lp(A, B, EOS)
    assert empty > a_b  # by plain log-prob the empty caption wins ...
    assert _captions(plain) == [[], [A, B]]
    # ... by log_prob / ((5 + length) / 6) ** alpha, with <eos> counted, "a b" does
    assert a_b / (8 / 6) > empty / 1.0
    assert _captions(gnmt) == [[A, B], []]
    # the log-probs reported stay the model's own
    assert gnmt.log_probs[0].tolist() == pytest.approx([a_b, empty], abs=1e-5)


def _eos_or_two_words(words):
    table = {(): {EOS: 0.4, A: 0.6}, (A,): {B: 0.55, D: 0.45}}
    return table.get(words, {EOS: 1.0})


def test_alpha_acts_during_the_search_unlike_the_final_length_penalty():
    """Beam 2: after one step the empty caption is finished and "a" grows. By plain log-prob
    the finished beam keeps its place against "a b" / "a d"; normalised (alpha=3) both longer
    beams pass it, so the empty caption is not among the 2 best at all, while the
    final-ranking-only length penalty can only reorder the beams that plain search kept."""
    toy = ToyDecoder(_eos_or_two_words)
    final_only = beam_search(
        toy, _images(), 2, 5, n_best=2, controls=DecodeControls(length_penalty=1.0), **IDS
    )
    assert _captions(final_only) == [[A, B], []]
    a_d = toy.lp(A) + toy.lp(A, D)
    assert a_d < toy.lp(EOS) and a_d / (7 / 6) ** 3 > toy.lp(EOS)  # the hand check
    gnmt = beam_search(toy, _images(), 2, 5, n_best=2, controls=DecodeControls(alpha=3.0), **IDS)
    assert _captions(gnmt) == [[A, B], [A, D]]


def _repeats(words):
    return {A: 0.6, B: 0.3, EOS: 0.1}


def test_no_repeat_ngram_size_rules_out_words_that_repeat_an_ngram():
    toy = ToyDecoder(_repeats)

    def greedy(n: int):
        controls = DecodeControls(no_repeat_ngram_size=n)
        return greedy_decode(toy, _images(), 6, controls=controls, **IDS)

    assert _captions(greedy(0)) == [[A] * 6]
    # bigrams: a a, then "a" would repeat (a, a): b; a; then a and b would repeat (a, a) and
    # (a, b): <eos>
    two = greedy(2)
    assert _captions(two) == [[A, A, B, A]]
    expected = toy.lp(A) + toy.lp(A, A) + toy.lp(A, A, B) + toy.lp(A, A, B, A)
    expected += toy.lp(A, A, B, A, EOS)
    assert float(two.log_probs[0, 0]) == pytest.approx(expected, abs=1e-5)
    assert _captions(greedy(1)) == [[A, B]]  # no word twice
    beams = beam_search(
        toy, _images(), 3, 6, n_best=3, controls=DecodeControls(no_repeat_ngram_size=2), **IDS
    )
    for words in _captions(beams):
        bigrams = list(itertools.pairwise(words))
        assert len(bigrams) == len(set(bigrams)), words
    drawn = sample_decode(
        toy,
        _images(),
        6,
        num_samples=32,
        generator=torch.Generator().manual_seed(0),
        controls=DecodeControls(no_repeat_ngram_size=1),
        **IDS,
    )
    assert all(len(w) == len(set(w)) for w in _captions(drawn))


def _short(words):
    return {EOS: 0.7, A: 0.2, B: 0.1}


def test_min_len_rules_out_eos_before_that_many_words():
    toy = ToyDecoder(_short)
    assert _captions(greedy_decode(toy, _images(), 6, **IDS)) == [[]]
    two = greedy_decode(toy, _images(), 6, controls=DecodeControls(min_len=2), **IDS)
    assert _captions(two) == [[A, A]]
    # not renormalised: the model's log-probs of "a a <eos>"
    expected = toy.lp(A) + toy.lp(A, A) + toy.lp(A, A, EOS)
    assert float(two.log_probs[0, 0]) == pytest.approx(expected, abs=1e-5)
    beams = beam_search(toy, _images(), 3, 6, n_best=3, controls=DecodeControls(min_len=2), **IDS)
    assert all(len(w) >= 2 for w in _captions(beams))
    assert _captions(beam_search(toy, _images(), 3, 6, **IDS)) == [[]]
    drawn = sample_decode(
        toy, _images(), 6, num_samples=32, controls=DecodeControls(min_len=3), **IDS
    )
    assert all(len(w) >= 3 for w in _captions(drawn))


def test_a_row_with_every_word_ruled_out_keeps_eos():
    """No word twice with five words (<unk> a b c d) and min_len 6: after five words nothing
    is left, and <eos> comes rather than a ruled-out word."""
    toy = ToyDecoder(lambda words: {A: 0.3, B: 0.25, C: 0.2, D: 0.15, UNK: 0.05, EOS: 0.05})
    controls = DecodeControls(no_repeat_ngram_size=1, min_len=6)
    out = greedy_decode(toy, _images(), 8, controls=controls, **IDS)
    assert _captions(out) == [[A, B, C, D, UNK]]
    assert torch.isfinite(out.log_probs).all()


def _two_ways(words):
    table = {(): {A: 0.6, B: 0.4}, (A,): {C: 0.55, D: 0.45}, (B,): {C: 0.55, D: 0.45}}
    return table.get(words, {EOS: 0.9}) if len(words) < 2 else {EOS: 0.9}


def test_diverse_beam_search_makes_groups_differ():
    """Beam 2: plain search keeps "a c" and "a d" (one first word). Two groups of one beam:
    group 0 takes "a"; for group 1, "a" costs its log-prob minus the strength, so "b" wins;
    next step "c" (group 0's word) costs group 1 the same: "b d"."""
    toy = ToyDecoder(_two_ways)
    plain = beam_search(toy, _images(), 2, 4, n_best=2, **IDS)
    assert _captions(plain) == [[A, C], [A, D]]
    controls = DecodeControls(beam_groups=2, diversity_strength=1.0)
    assert toy.lp(A) - 1.0 < toy.lp(B)  # the hand-computed first step of group 1
    assert toy.lp(B) + toy.lp(B, C) - 1.0 < toy.lp(B) + toy.lp(B, D)
    diverse = beam_search(toy, _images(), 2, 4, n_best=2, controls=controls, **IDS)
    assert _captions(diverse) == [[A, C], [B, D]]
    # ranked and reported by the model's log-probs, not the penalised search scores
    a_c = toy.lp(A) + toy.lp(A, C) + toy.lp(A, C, EOS)
    b_d = toy.lp(B) + toy.lp(B, D) + toy.lp(B, D, EOS)
    assert diverse.log_probs[0].tolist() == pytest.approx([a_c, b_d], abs=1e-5)
    # without a penalty the groups search alike
    same = beam_search(
        toy, _images(), 2, 4, n_best=2, controls=DecodeControls(beam_groups=2), **IDS
    )
    assert _captions(same) == [[A, C], [A, C]]


def _first_word(words):
    return {A: 0.5, B: 0.3, C: 0.15, D: 0.05} if not words else {EOS: 1.0}


def _first_words(controls: DecodeControls, n: int = 2000) -> Counter:
    toy = ToyDecoder(_first_word)
    out = sample_decode(
        toy,
        _images(),
        3,
        num_samples=n,
        generator=torch.Generator().manual_seed(0),
        controls=controls,
        **IDS,
    )
    return Counter(int(t) for t in out.tokens[0, :, 0])


def test_top_k_and_top_p_sample_among_the_likeliest_words():
    assert set(_first_words(DecodeControls())) == {A, B, C, D}
    top2 = _first_words(DecodeControls(top_k=2))
    assert set(top2) == {A, B}
    assert top2[A] / 2000 == pytest.approx(0.5 / 0.8, abs=0.04)  # renormalised over a, b
    # nucleus: a word stays while the likelier ones before it hold less than p
    assert set(_first_words(DecodeControls(top_p=0.7))) == {A, B}
    assert set(_first_words(DecodeControls(top_p=0.85))) == {A, B, C}
    assert set(_first_words(DecodeControls(top_p=0.45))) == {A}
    # the log-probs reported are the model's, not the truncated distribution's
    toy = ToyDecoder(_first_word)
    out = sample_decode(toy, _images(), 3, num_samples=4, controls=DecodeControls(top_k=1), **IDS)
    assert out.log_probs[0].tolist() == pytest.approx([toy.lp(A) + toy.lp(A, EOS)] * 4, abs=1e-5)


@pytest.mark.parametrize("baseline", ["leave_one_out", "greedy"])
def test_scst_sampling_baselines_sample_with_top_k_and_top_p(baseline):
    from hericap.training.scst import make_scst_decoder

    toy = ToyDecoder(_first_word)
    model = SimpleNamespace(decoder=toy)
    torch.manual_seed(0)
    decode = make_scst_decoder(baseline, 64, 3, BOS, EOS, PAD, top_p=0.7)
    samples, _ = decode(model, _images(2))
    assert {int(t) for t in samples[:, :, 0].flatten()} == {A, B}
    samples, greedy = make_scst_decoder(baseline, 8, 3, BOS, EOS, PAD, top_k=1)(model, _images())
    assert (samples[0, :, 0] == A).all()
    if baseline == "greedy":
        assert torch.equal(greedy[0, 0], samples[0, 0])


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["decode.alpha=0.9", "decode.length_penalty=1"], "two length penalties"),
        (["decode.alpha=-1"], "must be >= 0"),
        (["decode.beam_groups=2"], "must divide the beam size 5"),
        (["decode.diversity_strength=0.5"], "set decode.beam_groups >= 2"),
        (["decode.min_len=21"], "decode.min_len=21 at most"),
        (["decode.no_repeat_ngram_size=-1"], "must be >= 0"),
        (["decode.top_p=0"], "decode.top_p=0.0 in (0, 1]"),
        (["decode.top_k=-2"], "decode.top_k=-2 must be >= 0"),
        (["model.beam_search=research", "decode.min_len=2"], "research beam search"),
    ],
)
def test_bad_controls_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(["preset=demo", *overrides])
    assert message in str(e.value)


def test_controls_given_at_run_time_are_checked_too():
    toy = ToyDecoder(_short)
    with pytest.raises(ValueError, match="must divide the beam size 3"):
        beam_search(toy, _images(), 3, 5, controls=DecodeControls(beam_groups=2), **IDS)
    with pytest.raises(ValueError, match="research beam search"):
        decode_memories(
            toy, _images(), (BOS, EOS, PAD), search="research", controls=DecodeControls(alpha=1)
        )
    cfg = load_config(["preset=demo", "decode.test_beam_size=4", "decode.beam_groups=2"])
    assert cfg.decode.val_beam_size == 1  # greedy validation has no groups to form
    assert decode_controls(cfg.decode).describe(4) == "beam 4, beam_groups=2"


# ----------------------------------------------------------------- ensembles


def test_an_ensemble_of_one_is_that_model():
    model = _tiny_captioner(0)
    images = torch.randn(2, 3, 64, 64)
    alone = CaptionEnsemble([model])
    for beam in (1, 3):
        got = alone.generate(images, beam_size=beam, max_len=6, n_best=beam)
        assert _same(got, model.generate(images, beam_size=beam, max_len=6, n_best=beam))


def test_an_ensemble_of_two_searches_the_mean_of_their_log_probs():
    """Hand-computed: with max_len 1 the search picks the 3 likeliest first words of the mean
    distribution, then <eos> is forced, each member's <eos> log-prob computed after that word."""
    first, second = _tiny_captioner(0), _tiny_captioner(1)
    images = torch.randn(2, 3, 64, 64)
    pair = CaptionEnsemble([first, second])
    out = pair.generate(images, beam_size=3, max_len=1, n_best=3)
    mems = [m.encode(images) for m in (first, second)]

    def mean_step(tokens: torch.Tensor) -> torch.Tensor:
        """The mean over members of the log-probs after ``<bos> tokens``."""
        per_member = []
        for m, mem in zip((first, second), mems, strict=True):
            with torch.no_grad():
                log_probs, _ = m.decoder(tokens, mem)
            per_member.append(log_probs[:, -1])
        return torch.stack(per_member).mean(0)

    start = mean_step(torch.full((2, 1), BOS))
    start[:, [BOS, PAD]] = float("-inf")
    words = start.topk(3, dim=-1).indices
    for i in range(2):
        totals = []
        for w in words[i].tolist():
            after = mean_step(torch.tensor([[BOS, w], [BOS, w]]))[i, EOS]
            totals.append(float(start[i, w] + after))
        rank = sorted(range(3), key=lambda j: -totals[j])
        assert out.tokens[i, :, 0].tolist() == [words[i, j].item() for j in rank]
        assert out.log_probs[i].tolist() == pytest.approx([totals[j] for j in rank], abs=1e-5)
    # one member's search differs from the pair's (else the test would show nothing)
    assert not torch.equal(first.generate(images, beam_size=3, max_len=1).tokens, out.tokens[:, :1])


WORDS = [f"w{i}" for i in range(36)]


def _folder(path: Path, seed: int, *overrides: str, words=WORDS) -> Path:
    cfg = load_config(["preset=demo", *TINY_MODEL, *overrides])
    vocab = Vocabulary(words)
    torch.manual_seed(seed)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    return save_checkpoint(path, model, cfg, vocab, meta={"epoch": seed, "phase": "xe"})


def test_ensemble_members_must_share_vocabulary_and_inputs(tmp_path):
    from hericap.checkpoint.ensemble import load_models

    a = _folder(tmp_path / "a", 0)
    with pytest.raises(ValueError, match="different vocabularies"):
        load_models([a, _folder(tmp_path / "b", 1, words=[*WORDS[:-1], "other"])])
    with pytest.raises(ValueError, match="read images differently"):
        load_models([a, _folder(tmp_path / "c", 1, "dataset.image_size=96")])
    with pytest.raises(ValueError, match="padding rule"):
        load_models([a, _folder(tmp_path / "d", 1, "model.padding=research")])
    with pytest.raises(ValueError, match="names a folder twice"):
        load_models(f"{a},{a}")


def test_eval_takes_several_checkpoints_and_records_the_ensemble(tmp_path):
    from hericap.cli.train import eval_config, train_config
    from hericap.evaluation.inference import CaptionPredictor, caption_batch
    from hericap.runtime.batch_eval import decode_record, ensemble_training

    a, b = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1)
    cfg, paths = eval_config([f"exp.checkpoint={a},{b}", "decode.alpha=0.9", "split=val"])
    assert paths == [str(a), str(b)] and cfg.decode.alpha == 0.9
    with pytest.raises(FileNotFoundError, match="not a HeriCap checkpoint folder"):
        eval_config([f"exp.checkpoint={a},{tmp_path / 'missing'}"])
    with pytest.raises(ConfigError, match="training starts from one checkpoint"):
        train_config([f"exp.checkpoint={a},{b}"])
    record = decode_record(cfg, [a, b], 1.5)
    assert record["alpha"] == 0.9 and record["ensemble"] == [str(a), str(b)]
    assert record["search"] == "beam 5, alpha=0.9, ensemble of 2 (mean log-prob)"
    assert [m["epoch"] for m in ensemble_training([a, b])["members"]] == [0, 1]
    assert decode_record(cfg, [a], 1.5)["ensemble"] is None
    # batch inference decodes the pair as the ensemble does
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    predictor = CaptionPredictor(f"{a},{b}", beam_size=3, max_len=6)
    pair = predictor.loaded.model
    assert isinstance(pair, CaptionEnsemble) and len(pair.members) == 2
    vocab = predictor.loaded.vocab
    assert predictor.caption(images) == caption_batch(pair, vocab, images, 3, 6)


# ----------------------------------------------------------------- caption, serve


def test_caption_sample_and_controls_from_the_command_line(tmp_path, capsys):
    from hericap.cli import main
    from hericap.serve.service import CaptionService

    ckpt = _folder(tmp_path / "ckpt", 0)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), np.uint8)).save(photo)
    options = ["--checkpoint", str(ckpt), "--json", "--sample", "--n-best", "3"]
    assert main(["caption", str(photo), *options, "--top-k", "1", "--min-len", "2"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["decode"]["sample"] is True and line["decode"]["top_k"] == 1
    captions = [c["caption"] for c in line["captions"]]
    assert len(set(captions)) == 1 and len(captions[0].split()) >= 2  # top-1: greedy, thrice
    # sampling is seeded: the same call, the same samples; every word allowed, they differ
    service = CaptionService(str(ckpt), n_best=6, sample=True, seed=5)
    image = Image.open(photo)
    first = [b["caption"] for b in service.caption([image])[0]["beams"]]
    assert first == [b["caption"] for b in service.caption([image])[0]["beams"]]
    assert len(set(first)) > 1
    with pytest.raises(ValueError, match="unknown decoding controls"):
        CaptionService(str(ckpt), decode={"alpah": 1.0})
    beams = CaptionService(str(ckpt), beam_size=4, n_best=4, decode={"beam_groups": 2})
    assert beams.settings()["beam_groups"] == 2 and beams.settings()["alpha"] == 0.0
    # left out (or None), a control is the checkpoint's own decode.* value
    gnmt = _folder(tmp_path / "gnmt", 0, "decode.alpha=0.5")
    assert CaptionService(str(gnmt), decode={"alpha": None}).controls.alpha == 0.5
    assert CaptionService(str(gnmt), decode={"alpha": 0.0}).controls.alpha == 0.0


def test_serve_arguments_carry_the_controls_and_bad_ones_fail_before_deploying(tmp_path):
    from ray.serve import Application

    from hericap.cli import build_parser
    from hericap.cli.serve import _serve_args
    from hericap.serve.app import build_app

    ckpt = _folder(tmp_path / "ckpt", 0)
    args = build_parser().parse_args(
        ["serve", "--checkpoint", str(ckpt), "--alpha", "0.9", "--no-repeat-ngram-size", "3"]
    )
    serve_args = _serve_args(args)
    assert serve_args["alpha"] == 0.9 and serve_args["no_repeat_ngram_size"] == 3
    assert "min_len" not in serve_args  # left out: the checkpoint's
    assert isinstance(build_app(serve_args), Application)
    # `serve run ... beam_groups=2` passes strings; 2 groups cannot split 5 beams
    with pytest.raises(ValueError, match="must divide the beam size 5"):
        build_app({"checkpoint": str(ckpt), "beam_groups": "2"})
    assert isinstance(build_app({"checkpoint": str(ckpt), "alpha": "0.6"}), Application)
