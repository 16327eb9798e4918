"""Fast CIDEr-D equals the toolkit's; the Python PTB tokeniser equals the Java one; SCST pieces."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from toolkit_oracle import toolkit_cider_corpus_df, toolkit_document_frequency

from hericap.data.ptb import ptb_tokenize
from hericap.data.text import Vocabulary
from hericap.evaluation.cider import CiderD, cider_d_scores
from hericap.training.scst import CiderReward, advantages, scst_loss

REFS = {
    "a": ["a man riding a wave on a surfboard", "a surfer rides a large wave", "man surfing"],
    "b": ["two dogs play in the grass", "two brown dogs running on a lawn"],
    "c": ["a plate of food with broccoli and rice", "rice and broccoli on a plate"],
}
CANDS = {"a": "a man riding a wave", "b": "dogs dogs dogs in the grass", "c": "zebra zebra"}


def _toolkit_cider(refs, cands):
    from pycocoevalcap.cider.cider import Cider

    return Cider().compute_score(refs, {k: [v] for k, v in cands.items()})


def test_cider_matches_toolkit_with_df_from_evaluated_references():
    expected_mean, expected = _toolkit_cider(REFS, CANDS)
    mean, per_image = cider_d_scores(REFS, CANDS)
    assert mean == pytest.approx(expected_mean, abs=1e-9)
    for i, k in enumerate(REFS):
        assert per_image[k] == pytest.approx(expected[i], abs=1e-9)
    assert per_image["c"] == 0.0  # unseen words score nothing
    assert per_image["a"] > per_image["b"] > 0


def test_cider_matches_toolkit_with_df_from_a_fixed_corpus():
    corpus = {**REFS, "d": ["a dog on a surfboard", "a wave"], "e": ["grass and rice"]}
    cider = CiderD(corpus)
    ids = ["a", "a", "b", "c"]
    cands = ["a man riding a wave", "a surfer on a wave", "two dogs", ""]
    ours = cider.score(ids, cands)
    expected = toolkit_cider_corpus_df(
        toolkit_document_frequency(corpus),
        len(corpus),
        [(c, corpus[k]) for k, c in zip(ids, cands, strict=True)],
    )
    for i in range(len(ids)):
        assert ours[i] == pytest.approx(expected[i], abs=1e-9)
    assert ours[3] == 0.0  # the empty caption


def test_cider_refuses_unknown_images_and_empty_references():
    with pytest.raises(KeyError, match="not in the reference corpus"):
        CiderD(REFS).score(["zzz"], ["a man"])
    with pytest.raises(ValueError, match="no references"):
        CiderD({"a": []})


def test_key_index_finds_present_keys_and_only_those():
    from hericap.evaluation.cider import _KeyIndex

    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(1, 1 << 62, size=5000, dtype=np.int64).astype(np.uint64))
    # keys that share their hash slot collide on purpose: lookups must probe past each other
    # and, after the vectorised probe rounds, fall back to the binary search
    index = _KeyIndex(keys)
    small = np.arange(1, 1_000_000, dtype=np.uint64)
    colliding = small[index._slot(small) == 7]
    assert len(colliding) >= 12
    keys = np.unique(np.concatenate([keys, colliding[:6]]))
    index = _KeyIndex(keys)  # same table size, so the six share slot 7
    absent = np.setdiff1d(
        rng.integers(1, 1 << 62, size=3000, dtype=np.int64).astype(np.uint64), keys
    )
    needles = rng.permutation(np.concatenate([keys, absent, colliding[6:12]]))
    expected = np.searchsorted(keys, needles)
    expected = np.where(keys[np.minimum(expected, len(keys) - 1)] == needles, expected, -1)
    assert np.array_equal(index.lookup(needles), expected)
    assert (expected >= 0).sum() == len(keys)  # every key found, nothing else
    assert np.array_equal(_KeyIndex(keys[:0]).lookup(needles[:3]), [-1, -1, -1])


def test_python_ptb_tokeniser_on_hand_made_cases():
    cases = {
        "A close-up of a man's hat.": "a close-up of a man 's hat",
        "It isn't (really) a T.V., is it?": "it is n't -lrb- really -rrb- a t.v. is it",
        "The clock reads 11:44 and costs $1,000.": "the clock reads 11:44 and costs $ 1,000",
        '"Two" dogs... on Main St. today': "two dogs on main st. today",
        "a sign that reads K.": "a sign that reads k",
        "we cannot go": "we can not go",
    }
    for raw, expected in cases.items():
        assert ptb_tokenize(raw) == expected, raw


@pytest.mark.realdata
@pytest.mark.java
def test_python_ptb_tokeniser_matches_java_on_real_captions(realdata):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    coco = json.loads((realdata / "coco/captions_val2017.json").read_text())
    flickr = json.loads((realdata / "flickr8k/dataset_flickr8k.json").read_text())
    captions = [a["caption"] for a in coco["annotations"]]
    captions += [s["raw"] for im in flickr["images"] for s in im["sentences"]]
    assert len(captions) == 25014 + 40000
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    mismatches = [c for i, c in enumerate(captions) if ptb_tokenize(c) != java[i][0]]
    # Raw human text: all but a handful (street-name abbreviations, "5:54pm", "at&t").
    assert len(mismatches) <= 10, mismatches[:10]
    # The text HeriCap produces (vocabulary words joined by spaces) is a fixed point of both.
    produced = [java[i][0] for i in range(0, len(captions), 7)]
    again = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(produced)})
    for i, text in enumerate(produced):
        assert ptb_tokenize(text) == text == again[i][0]


@pytest.mark.realdata
def test_cider_matches_toolkit_on_real_captions(realdata):
    gt = json.loads((realdata / "coco-caption/captions_val2014_fakecap_subset_gt.json").read_text())
    res = json.loads(
        (realdata / "coco-caption/captions_val2014_fakecap_subset_results.json").read_text()
    )
    refs: dict[str, list[str]] = {}
    for a in gt["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(ptb_tokenize(a["caption"]))
    cands = {str(r["image_id"]): ptb_tokenize(r["caption"]) for r in res}
    expected_mean, expected = _toolkit_cider(refs, cands)
    mean, per_image = cider_d_scores(refs, cands)
    assert mean == pytest.approx(expected_mean, abs=1e-9)
    assert max(abs(per_image[k] - e) for k, e in zip(refs, expected, strict=True)) <= 1e-9
    # reward setting: df from the Flickr8k training references, candidates of other images
    flickr = json.loads((realdata / "flickr8k/dataset_flickr8k.json").read_text())
    corpus = {
        str(im["imgid"]): [ptb_tokenize(s["raw"]) for s in im["sentences"]]
        for im in flickr["images"]
        if im["split"] == "train"
    }
    rng = random.Random(0)
    ids = rng.sample(sorted(corpus), 50)
    cands_fixed = [corpus[rng.choice(sorted(corpus))][0] for _ in ids]
    # sampled captions in SCST are not corpus sentences: shuffled words make n-grams that no
    # reference has, and repeated words make term frequencies above one
    shuffled = [" ".join(rng.sample(c.split(), len(c.split()))) for c in cands_fixed[:5]]
    repeated = [" ".join(w for w in c.split() for _ in range(2)) for c in cands_fixed[5:10]]
    cands_fixed[:10] = shuffled + repeated
    ours = CiderD(corpus).score(ids, cands_fixed)
    document_frequency = toolkit_document_frequency(corpus)  # once: it is the slow part
    for i, k in enumerate(ids[:15]):
        expected_i = toolkit_cider_corpus_df(
            document_frequency, len(corpus), [(cands_fixed[i], corpus[k])]
        )[0]
        assert ours[i] == pytest.approx(expected_i, abs=1e-9)


def _vocab():
    return Vocabulary.build([c for v in REFS.values() for c in v], min_count=1)


def test_reward_scores_token_ids_like_text_and_counts_eos():
    vocab = _vocab()
    with_eos = CiderReward(REFS, vocab, include_eos=True)
    without = CiderReward(REFS, vocab, include_eos=False)
    words = ["a", "man", "riding", "a", "wave"]
    ids = [vocab.stoi[w] for w in words]
    full = torch.tensor([[*ids, vocab.eos_idx, vocab.pad_idx]])
    # trailing tokens after <eos> must be ignored
    noisy = torch.tensor([[*ids, vocab.eos_idx, vocab.stoi["dogs"]]])
    assert with_eos(["a"], full)[0] == pytest.approx(with_eos(["a"], noisy)[0], abs=1e-12)
    text = " ".join(words)
    assert without(["a"], full)[0] == pytest.approx(without.cider.score(["a"], [text])[0])
    assert with_eos(["a"], full)[0] == pytest.approx(
        with_eos.cider.score(["a"], [text + " <eos>"])[0]
    )
    # a truncated caption ("a man riding a") loses more with <eos> in the reward string
    cut = torch.tensor([[*ids[:4], vocab.eos_idx, vocab.pad_idx]])
    drop_with = with_eos(["a"], full)[0] - with_eos(["a"], cut)[0]
    drop_without = without(["a"], full)[0] - without(["a"], cut)[0]
    assert drop_with > drop_without


def test_reward_accepts_whitespace_only_vocabulary_entries():
    """The research vocabulary has entries such as " " and "\\n": they decode to no word, so a
    caption holding them is rewarded as the same caption without them."""
    vocab = _vocab()
    vocab = Vocabulary([*vocab.itos, " ", "\n", "  "])
    reward = CiderReward(REFS, vocab, include_eos=True)
    words = ["a", "man", "riding", "a", "wave"]
    ids = [vocab.stoi[w] for w in words]
    blank, newline = vocab.stoi[" "], vocab.stoi["\n"]
    clean = torch.tensor([[*ids, vocab.eos_idx, vocab.pad_idx, vocab.pad_idx]])
    spaced = torch.tensor([[ids[0], blank, *ids[1:3], newline, *ids[3:], vocab.eos_idx]])
    assert reward(["a"], spaced)[0] == pytest.approx(reward(["a"], clean)[0], abs=1e-12)
    assert reward(["a"], clean)[0] > 0
    with pytest.raises(ValueError, match="single words"):
        CiderReward(REFS, Vocabulary([*vocab.itos, "two words"]))


def test_advantages_for_each_baseline():
    rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(advantages(rewards, "beam_mean"), [[-1, 0, 1], [-1, -1, 2]])
    np.testing.assert_allclose(
        advantages(rewards, "leave_one_out"), [[-1.5, 0, 1.5], [-1.5, -1.5, 3]]
    )
    np.testing.assert_allclose(
        advantages(rewards, "greedy", np.array([2.0, 1.0])), [[-1, 0, 1], [-1, -1, 2]]
    )
    with pytest.raises(ValueError, match="greedy captions"):
        advantages(rewards, "greedy")
    with pytest.raises(ValueError, match="unknown SCST baseline"):
        advantages(rewards, "mean")


def test_scst_loss_is_length_normalised_and_masks_after_eos():
    eos, pad = 3, 1
    tokens = torch.tensor([[5, 6, eos, pad], [5, eos, pad, pad]])
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    loss = scst_loss(logp, tokens, eos, torch.tensor([1.0, -1.0]))
    loss.backward()
    # mean token log-prob is -1 for both rows: loss = -(1 * -1 + -1 * -1) / 2 = 0
    assert loss.item() == pytest.approx(0.0)
    grad = logp.grad
    assert torch.all(grad[0, 3] == 0) and torch.all(grad[1, 2:] == 0)  # padding gets nothing
    assert grad[0, 0].item() == pytest.approx(-1 / 3 / 2)  # positive advantage: push up
    assert grad[1, 0].item() == pytest.approx(1 / 2 / 2)
