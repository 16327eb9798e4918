"""Scoring through the coco-caption toolkit equals the toolkit used directly."""

from __future__ import annotations

import json

import pytest

from hericap.evaluation.coco_metrics import CocoScorer, cider_d, find_spice
from hericap.evaluation.report import build_report, format_table

pytestmark = pytest.mark.java

REFS = {
    "1": [
        "A man riding a wave on top of a surfboard.",
        "a surfer rides a large wave",
        "A person on a surfboard in the ocean.",
        "man surfing on a big blue wave",
        "A surfer is riding the crest of a wave.",
    ],
    "2": [
        "Two dogs play in the grass.",
        "two brown dogs running on a lawn",
        "A pair of dogs playing outside on the grass.",
        "dogs chasing each other in a park",
        "Two puppies are playing on green grass.",
    ],
    "3": [
        "A plate of food with broccoli and rice.",
        "a dinner plate with rice and vegetables",
        "Rice, broccoli and chicken on a white plate.",
        "a meal of rice and broccoli",
        "food on a plate including broccoli",
    ],
}
CANDS = {
    "1": "a man riding a wave on a surfboard",
    "2": "two dogs playing in the grass",
    "3": "a plate of rice and broccoli",
}


def _toolkit_scores(refs, cands, cider_only: bool = False) -> dict[str, float]:
    """The coco-caption toolkit run directly (PTB tokeniser and METEOR are Java: seconds each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in cands.items()})
    out = {"CIDEr": Cider().compute_score(gts, res)[0]}
    if not cider_only:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"Bleu_{i + 1}": b for i, b in enumerate(bleu)})
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
        out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def scorer(coco_scorer):
    return coco_scorer


def test_hand_made_example_matches_toolkit(scorer):
    ours = scorer.score(REFS, CANDS)
    theirs = _toolkit_scores(REFS, CANDS)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert ours["CIDEr"] > 0 and 0 < ours["Bleu_4"] <= ours["Bleu_1"] <= 1


def test_spice_reported_unavailable_with_reason(scorer, monkeypatch, tmp_path):
    monkeypatch.setenv("HERICAP_SPICE_JARS", str(tmp_path))
    status = find_spice()
    if status.available:
        pytest.skip("CoreNLP jars are installed on this machine")
    assert "stanford-corenlp-3.6.0" in status.reason and str(tmp_path) in status.reason
    assert scorer.score(REFS, CANDS)["SPICE"] is None


def test_spice_that_fails_to_run_is_reported_with_the_java_error(tmp_path, caplog):
    # The CoreNLP 3.6.0 jars cannot be obtained offline, so this runs the real SPICE jar under
    # our Java 17 flags with two empty files in their place: the JVM accepts the flags, SPICE
    # parses our arguments and input and gets as far as loading CoreNLP's first class.
    from hericap.evaluation.coco_metrics import CORENLP_JARS

    for name in CORENLP_JARS:
        (tmp_path / name).write_bytes(b"")
    assert find_spice(str(tmp_path)).available
    with CocoScorer(meteor=False, spice_jars=str(tmp_path)) as s:
        first = s.score(REFS, CANDS)
        reason = s.spice.reason
        assert not s.spice.available
        assert s.score(REFS, CANDS) == first  # marked unavailable: not retried
    assert first["SPICE"] is None and first["CIDEr"] > 0 and first["Bleu_4"] > 0
    assert reason.startswith("SPICE failed (exit 1): java.lang.NoClassDefFoundError: edu/stanford")
    assert "edu.anu.spice.SpiceParser" in caplog.text  # the full Java trace is logged


def test_ids_must_match(scorer):
    with pytest.raises(ValueError, match="ids differ"):
        scorer.score(REFS, {"1": "a man"})


def test_report_oracle_and_four_reference_scores(scorer):
    report = build_report(scorer, REFS, CANDS)
    rest = {k: v[1:] for k, v in REFS.items()}
    assert report["metrics_4ref"]["CIDEr"] == pytest.approx(
        _toolkit_scores(rest, CANDS, cider_only=True)["CIDEr"], abs=1e-12
    )
    assert report["oracle"]["CIDEr"] == pytest.approx(
        _toolkit_scores(rest, {k: v[0] for k, v in REFS.items()}, cider_only=True)["CIDEr"],
        abs=1e-12,
    )
    table = format_table(report)
    assert "human oracle" in table and "CIDEr" in table
    # a second checkpoint on the same references skips the (unchanged) oracle
    second = build_report(scorer, REFS, CANDS, with_oracle=False)
    assert second["oracle"] is None and second["oracle_semantic"] is None
    assert second["metrics_4ref"] == report["metrics_4ref"]


def test_python_cider_matches_toolkit_on_clean_text():
    refs = {
        k: [" ".join(c.lower().replace(".", "").replace(",", "").split()) for c in v]
        for k, v in REFS.items()
    }
    from pycocoevalcap.cider.cider import Cider

    expected = Cider().compute_score(refs, {k: [v] for k, v in CANDS.items()})[0]
    assert cider_d(REFS, CANDS) == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def fakecap(realdata):
    """The toolkit's own example (its fake captions of a val2014 subset): the two files, their
    references and candidates, and the toolkit's scores of them (run once for this module)."""
    gt = realdata / "coco-caption/captions_val2014_fakecap_subset_gt.json"
    res = realdata / "coco-caption/captions_val2014_fakecap_subset_results.json"
    refs: dict[str, list[str]] = {}
    for a in json.loads(gt.read_text())["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    cands = {str(r["image_id"]): r["caption"] for r in json.loads(res.read_text())}
    return gt, res, refs, cands, _toolkit_scores(refs, cands)


@pytest.mark.realdata
def test_real_coco_caption_example_matches_toolkit(fakecap, scorer):
    _, _, refs, cands, theirs = fakecap
    assert len(cands) == 334 and sum(len(v) for v in refs.values()) == 1672
    ours = scorer.score(refs, cands)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.realdata
def test_score_command_equals_toolkit_on_real_results_file(fakecap, capsys):
    from hericap.cli import main

    gt, res, _, _, theirs = fakecap
    assert main(["score", "--results", str(res), "--annotations", str(gt), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    ours = json.loads(out[-1])
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert set(ours) >= {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}


def test_score_command_rejects_bad_files_with_reasons(tmp_path, capsys):
    from hericap.cli import main

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"annotations": [{"image_id": 1, "caption": "a dog"}]}))
    res = tmp_path / "res.json"
    res.write_text(json.dumps([{"image_id": 2, "caption": "a cat"}]))
    assert main(["score", "--results", str(res), "--annotations", str(ann)]) == 2
    res.write_text("{not json")
    assert main(["score", "--results", str(res), "--annotations", str(ann)]) == 2
    res.write_text(json.dumps([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}]))
    assert main(["score", "--results", str(res), "--annotations", str(ann)]) == 2
    assert main(["score", "--results", str(tmp_path / "nope.json"), "--annotations", str(ann)]) == 2
    err = capsys.readouterr().err
    assert "no annotations" in err and "not valid JSON" in err
    assert "more than one result" in err and "not found" in err
