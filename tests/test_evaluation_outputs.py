"""What an evaluation reports and writes beyond the corpus metrics (no Ray cluster): per-image
and per-domain toolkit scores, caption diversity and the collapse alarm, the nocaps EvalAI and
COCO test-server files, the per-image file. Real captions from the realdata fixture."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from hericap.config import load_config
from hericap.evaluation.diversity import caption_fingerprints, collapse_warning, diversity_scores
from hericap.evaluation.report import build_report, format_table, format_worst
from hericap.evaluation.submission import (
    coco_subset,
    submission_name,
    worst_images,
    write_evaluation_files,
)

# Images of the toolkit's example taken into the Java tests (enough for three domains, cheap).
N_IMAGES = 45
DOMAINS = ("in-domain", "near-domain", "out-domain")


@pytest.fixture(scope="module")
def fakecap(realdata):
    """The coco-caption toolkit's example: references and fake captions of val2014 images."""
    gt = json.loads((realdata / "coco-caption/captions_val2014_fakecap_subset_gt.json").read_text())
    res = json.loads(
        (realdata / "coco-caption/captions_val2014_fakecap_subset_results.json").read_text()
    )
    refs: dict[str, list[str]] = {}
    for a in gt["annotations"]:
        refs.setdefault(str(a["image_id"]), []).append(a["caption"])
    cands = {str(r["image_id"]): r["caption"] for r in res}
    ids = sorted(cands)[:N_IMAGES]
    return {k: refs[k] for k in ids}, {k: cands[k] for k in ids}


@pytest.fixture(scope="module")
def scorer(coco_scorer):
    return coco_scorer


def _tokenised(refs, cands):
    """The toolkit's PTB tokenisation of references and candidates (one JVM each)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in cands.items()})
    return gts, res


def _toolkit_direct(gts, res, ids, meteor):
    """The toolkit's metrics run directly on the tokenised captions of ``ids``: (corpus,
    per-image) by metric."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = {k: gts[k] for k in ids}, {k: res[k] for k in ids}
    out = {}
    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"Bleu_{n + 1}"] = (bleu[n], dict(zip(ids, bleu_images[n], strict=True)))
    for key, metric in (("METEOR", meteor), ("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        value, values = metric.compute_score(gts, res)
        out[key] = (value, dict(zip(ids, values, strict=True)))
    return out


# ----------------------------------------------------------------------------- diversity


def test_diversity_counts_distinct_ngrams_words_and_captions_by_hand():
    candidates = {
        "1": "a dog runs on the grass",
        "2": "A dog runs on the grass.",  # the same caption once tokenised
        "3": "a cat sleeps",
        "4": "a dog",
    }
    d = diversity_scores(candidates)
    # unigrams: 6 + 6 + 3 + 2 = 17, distinct {a dog runs on the grass cat sleeps} = 8
    assert d["distinct_1"] == pytest.approx(8 / 17)
    # bigrams: 5 + 5 + 2 + 1 = 13, distinct: a-dog dog-runs runs-on on-the the-grass a-cat
    # cat-sleeps = 7
    assert d["distinct_2"] == pytest.approx(7 / 13)
    assert d["vocab_used"] == 8 and d["images"] == 4
    assert d["unique_share"] == pytest.approx(3 / 4)
    assert d["novel_share"] is None and not d["collapse"]
    assert diversity_scores(candidates, collapse_unique_share=0.8)["collapse"]


def test_novel_share_on_real_captions_equals_a_direct_set_lookup(realdata, fakecap):
    """The fake captions of the toolkit's example against the real COCO 2017 val captions:
    the fingerprint lookup equals comparing the strings without case, spaces and punctuation."""
    annotations = json.loads((realdata / "coco/captions_val2017.json").read_text())["annotations"]
    train = [a["caption"] for a in annotations]
    _, cands = fakecap
    # make some candidates copies of training captions, with other case and punctuation
    copied = {k: train[i * 97].upper().rstrip(".") + " ." for i, k in enumerate(sorted(cands)[:9])}
    cands = {**cands, **copied}
    fingerprints = caption_fingerprints(train)
    assert len(fingerprints) == len({re.sub(r"[^0-9a-z]", "", c.lower()) for c in train})

    def squash(c: str) -> str:
        return re.sub(r"[^0-9a-z]", "", c.lower())

    seen = {squash(c) for c in train}
    expected = np.mean([squash(c) not in seen for c in cands.values()])
    got = diversity_scores(cands, fingerprints)["novel_share"]
    assert got == pytest.approx(expected) and got <= 1 - 9 / len(cands)


def test_the_collapse_alarm_names_the_causes_for_the_phase():
    same = {str(i): "a man standing in a room" for i in range(40)}
    d = diversity_scores({**same, "x": "a red bus"}, collapse_unique_share=0.1)
    assert d["collapse"] and d["unique_share"] == pytest.approx(2 / 41)
    xe = collapse_warning(d, "val, finetune_xe epoch 3", scst=False)
    sc = collapse_warning(d, "val, finetune_sc epoch 4", scst=True)
    assert "2 distinct captions for 41 images" in xe and "optimizer.xe_lr" in xe
    assert "SCST reward" not in xe and "SCST reward" in sc and "sc_include_eos" in sc
    assert collapse_warning(diversity_scores(same, collapse_unique_share=0.0), "x", True) is None


# ----------------------------------------------------------------------------- toolkit


@pytest.mark.java
@pytest.mark.realdata
def test_per_image_and_per_domain_scores_equal_the_toolkit_run_directly(fakecap, scorer):
    """Per-image values are the toolkit's own; each nocaps domain is scored on its images alone
    (CIDEr's document frequencies change with the subset), overall on all of them; the report
    also carries the model's and the oracle's diversity, and its table shows it all."""
    refs, cands = fakecap
    domains = {k: DOMAINS[i % 3] for i, k in enumerate(sorted(cands))}
    report = build_report(scorer, refs, cands, groups=domains, per_image=True)
    gts, res = _tokenised(refs, cands)
    meteor = scorer._meteor  # the toolkit's own Meteor object (its JVM takes ~6 s to start)
    direct = _toolkit_direct(gts, res, sorted(cands), meteor)
    alone = {
        d: _toolkit_direct(gts, res, [k for k in sorted(cands) if domains[k] == d], meteor)
        for d in DOMAINS
    }
    for key, (corpus, per_image) in direct.items():
        assert report["metrics"][key] == pytest.approx(corpus, abs=1e-12), key
        for k, value in per_image.items():
            assert report["per_image"][k][key] == pytest.approx(value, abs=1e-12), (key, k)
    assert sorted(report["domains"]) == sorted(DOMAINS)
    for domain, scores in alone.items():
        for key, (corpus, _) in scores.items():
            assert report["domains"][domain][key] == pytest.approx(corpus, abs=1e-12), (domain, key)
    # a subset's CIDEr is not the mean of the overall per-image CIDEr (idf differs)
    first = [k for k in cands if domains[k] == DOMAINS[0]]
    assert report["domains"][DOMAINS[0]]["CIDEr"] != pytest.approx(
        np.mean([report["per_image"][k]["CIDEr"] for k in first]), abs=1e-6
    )
    assert report["domain_images"] == {d: N_IMAGES // 3 for d in DOMAINS}
    assert report["diversity"] == diversity_scores(cands)
    assert report["oracle_diversity"] == diversity_scores({k: v[0] for k, v in refs.items()})
    table = format_table(report)
    assert "near-domain" in table and "overall" in table and "distinct_2" in table
    assert "unique_share" in table and "oracle" in table


def test_a_split_without_references_gets_diversity_and_no_scores():
    class NoToolkit:  # must not be called: nothing to score against
        spice = type("S", (), {"reason": "n/a"})()

        def evaluate(self, *a, **k):
            raise AssertionError("scored a split without references")

    cands = {"1": "a dog", "2": "a cat", "3": "a dog"}
    report = build_report(
        NoToolkit(), {k: [] for k in cands}, cands, groups=dict.fromkeys(cands, "in-domain")
    )
    assert report["metrics"] is None and "no reference captions" in report["metrics_status"]
    assert report["diversity"]["unique_share"] == pytest.approx(2 / 3)
    assert report["domain_images"] == {"in-domain": 3}
    assert format_table(report).startswith("no scores: this split has no reference captions")


# ----------------------------------------------------------------------------- files


def test_submission_names_and_coco_subsets():
    assert submission_name(None, "ray_test.v2") == "ray-test-v2"
    assert submission_name("my-model", "ignored") == "my-model"
    val = ["val2014/COCO_val2014_000000391895.jpg", "COCO_val2014_000000000042.jpg"]
    assert coco_subset(val) == "val2014"
    assert coco_subset(["COCO_test2014_000000000001.jpg"]) == "test2014"
    assert coco_subset([*val, "COCO_test2014_000000000001.jpg"]) is None  # mixed
    assert coco_subset(["000000397133.jpg"]) is None  # COCO 2017 names carry no subset
    assert coco_subset(["1026685415_0431cbf574.jpg"]) is None


def test_evaluation_files_for_nocaps_the_coco_server_and_per_image(tmp_path, caplog):
    cands = {"7": "a dog on grass", "12": "two cats", "3": "a red bus"}
    refs = {"7": ["a dog"], "12": ["two cats sleeping"], "3": ["a bus"]}
    metrics = {
        "7": {"CIDEr": 0.5, "SPICE": float("nan")},
        "12": {"CIDEr": 2.0, "SPICE": 0.3},
        "3": {"CIDEr": 0.1, "SPICE": 0.2},
    }
    report = {"per_image": metrics, "clip": {"per_image": {k: {"CLIPScore": 0.7} for k in cands}}}
    names = [f"val2014/COCO_val2014_{int(k):012d}.jpg" for k in cands]
    with caplog.at_level(logging.WARNING):
        files = write_evaluation_files(
            tmp_path,
            "val",
            cands,
            report,
            name="hc-1",
            source="nocaps",
            file_names=names,
            references=refs,
            domains={"7": "in-domain", "12": "out-domain", "3": "near-domain"},
            per_image=True,
            worst_n=2,
        )
    evalai = json.loads((tmp_path / "nocaps_val_hc-1_evalai.json").read_text())
    server = json.loads((tmp_path / "captions_val2014_hc-1_results.json").read_text())
    expected = [{"image_id": i, "caption": cands[str(i)]} for i in (3, 7, 12)]
    assert evalai == expected and server == expected  # integer ids, sorted, one per image
    assert files["nocaps_evalai"].endswith("nocaps_val_hc-1_evalai.json")
    assert "EvalAI scores them all" in caplog.text and "COCO server scores all 40504" in caplog.text
    body = json.loads((tmp_path / "val_per_image.json").read_text())
    assert [r["image_id"] for r in body["worst"]] == ["3", "7"] and body["worst_by"] == "CIDEr"
    row = {r["image_id"]: r for r in body["images"]}["7"]
    assert row["SPICE"] is None and row["CLIPScore"] == 0.7 and row["domain"] == "in-domain"
    assert row["references"] == ["a dog"] and row["caption"] == "a dog on grass"
    assert "per_image" not in report and "per_image" not in report["clip"]
    assert report["worst_images"] == body["worst"]
    assert "a red bus" in format_worst(report["worst_images"])
    results = json.loads((tmp_path / "val_results.json").read_text())
    assert [r["image_id"] for r in results] == ["12", "3", "7"]


def test_server_files_need_integer_ids(tmp_path):
    with pytest.raises(ValueError, match="integer image ids"):
        write_evaluation_files(tmp_path, "test", {"abc": "a dog"}, {}, name="x", source="nocaps")


def test_worst_images_ranks_by_cider_then_id_and_skips_unscored():
    rows = [
        {"image_id": "b", "CIDEr": 0.1},
        {"image_id": "a", "CIDEr": 0.1},
        {"image_id": "c", "CIDEr": None},
        {"image_id": "d", "CIDEr": 3.0},
    ]
    assert [r["image_id"] for r in worst_images(rows, 3)] == ["a", "b", "d"]


@pytest.fixture(scope="module")
def nocaps_shards(realdata, tmp_path_factory):
    """nocaps-format files (val with captions, test without) over nine real Flickr8k photos and
    their human captions, prepared into shards as `hericap prepare nocaps` does."""
    from hericap.data.prepare import prepare_records
    from hericap.data.readers import read_nocaps

    sample = json.loads((realdata / "flickr8k/sample_captions.json").read_text())
    root = tmp_path_factory.mktemp("nocaps")
    images = [
        {"id": i, "file_name": im["file_name"], "domain": DOMAINS[i % 3], "open_images_id": f"o{i}"}
        for i, im in enumerate(sample["images"][:9])
    ]
    flickr_id = {im["file_name"]: im["id"] for im in sample["images"]}
    annotations = [
        {"image_id": im["id"], "caption": a["caption"]}
        for im in images
        for a in sample["annotations"]
        if a["image_id"] == flickr_id[im["file_name"]]
    ]
    (root / "val.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "test.json").write_text(json.dumps({"images": images[:4], "annotations": []}))
    photos = realdata / "flickr8k/images"
    records = read_nocaps(root / "val.json", photos, "val")
    records += read_nocaps(root / "test.json", photos, "test")
    prepare_records(records, root / "shards", source="nocaps", min_count=1, progress=False)
    return root / "shards"


@pytest.mark.java
@pytest.mark.realdata
def test_nocaps_shards_are_scored_per_domain_and_written_for_evalai(
    nocaps_shards, scorer, tmp_path
):
    """The batch-evaluation path after decoding: the domains come from the shards' meta column,
    val is scored overall and per domain, test (no captions) is written for EvalAI unscored."""
    from hericap.runtime.batch_eval import score_split, split_references

    cfg = load_config(
        [
            "dataset.name=nocaps",
            f"dataset.shard_dir={nocaps_shards}",
            "evaluation.per_image=True",
            "evaluation.worst_images=2",
            "evaluation.submission_name=hc",
        ]
    )
    val = split_references(cfg, "val")
    assert val.source == "nocaps" and len(val.references) == 9
    assert sorted(val.domains.items()) == [(str(i), DOMAINS[i % 3]) for i in range(9)]
    # each image captioned with another image's first caption: imperfect, per-image scores vary
    ids = sorted(val.references, key=int)
    cands = {k: val.references[ids[(i + 1) % 9]][0] for i, k in enumerate(ids)}
    report = score_split(cfg, val, cands, scorer, with_oracle=False)
    assert (
        sorted(report["domains"]) == sorted(DOMAINS) and report["domain_images"]["in-domain"] == 3
    )
    assert report["diversity"]["novel_share"] is None  # nocaps shards have no train split
    assert "no train split" in report["diversity"]["novel_from"]
    assert (
        report["clip"]["available"] is False
        and "evaluation.clip_checkpoint" in (report["clip"]["status"])
    )
    files = write_evaluation_files(
        tmp_path,
        "val",
        cands,
        report,
        name="hc",
        source=val.source,
        per_image=True,
        worst_n=2,
        references=val.references,
        domains=val.domains,
    )
    evalai = json.loads((tmp_path / "nocaps_val_hc_evalai.json").read_text())
    assert [r["image_id"] for r in evalai] == list(range(9)) and "per_image" in files
    worst = report["worst_images"]
    assert len(worst) == 2 and worst[0]["CIDEr"] <= worst[1]["CIDEr"]
    assert worst[0]["CIDEr"] == min(
        r["CIDEr"] for r in json.loads((tmp_path / "val_per_image.json").read_text())["images"]
    )

    test = split_references(cfg, "test")
    assert all(not v for v in test.references.values()) and len(test.references) == 4
    unscored = score_split(cfg, test, {k: "a dog" for k in test.references}, scorer)
    assert unscored["metrics"] is None and unscored["diversity"]["unique_share"] == 0.25
    write_evaluation_files(
        tmp_path,
        "test",
        {k: "a dog" for k in test.references},
        unscored,
        name="hc",
        source=test.source,
    )
    assert len(json.loads((tmp_path / "nocaps_test_hc_evalai.json").read_text())) == 4


@pytest.mark.realdata
def test_coco_test2014_images_without_captions_give_the_server_file(realdata, tmp_path):
    """An image-info file (no annotations, as COCO ships test2014) over real photos named as
    COCO names them: prepared, read back, reported unscored and written in the server's
    layout (integer ids, sorted, captions_test2014_<name>_results.json)."""
    import shutil

    from hericap.data.prepare import prepare_records
    from hericap.data.readers import read_coco_captions
    from hericap.evaluation.coco_metrics import CocoScorer
    from hericap.runtime.batch_eval import score_split, split_references

    photos = sorted((realdata / "flickr8k/images").glob("*.jpg"))[:5]
    images = []
    for i, photo in enumerate(photos):
        name = f"COCO_test2014_{1000 + 7 * i:012d}.jpg"
        shutil.copy(photo, tmp_path / name)
        images.append({"id": 1000 + 7 * i, "file_name": name})
    (tmp_path / "image_info_test2014.json").write_text(json.dumps({"images": images}))
    records = read_coco_captions(tmp_path / "image_info_test2014.json", tmp_path, split="test")
    assert all(r.captions == [] for r in records)
    prepare_records(records, tmp_path / "shards", source="coco_captions", progress=False)
    cfg = load_config(["dataset.name=coco_captions", f"dataset.shard_dir={tmp_path / 'shards'}"])
    split = split_references(cfg, "test")
    cands = {k: f"a photo number {k}" for k in split.references}
    with CocoScorer(meteor=False) as scorer:
        report = score_split(cfg, split, cands, scorer)
    assert report["metrics"] is None and report["diversity"]["unique_share"] == 1.0
    files = write_evaluation_files(
        tmp_path / "out",
        "test",
        cands,
        report,
        name=submission_name(None, "coco_run"),
        source=split.source,
        file_names=split.file_names.values(),
    )
    assert files["coco_server"].endswith("captions_test2014_coco-run_results.json")
    server = json.loads((tmp_path / "out/captions_test2014_coco-run_results.json").read_text())
    assert [r["image_id"] for r in server] == [1000 + 7 * i for i in range(5)]
    assert server[0] == {"image_id": 1000, "caption": "a photo number 1000"}


def test_eval_per_image_and_worst_options_become_evaluation_keys():
    from hericap.cli import build_parser
    from hericap.cli.train import eval_overrides

    args = build_parser().parse_args(["eval", "exp.checkpoint=c", "--per-image", "--worst", "5"])
    overrides = eval_overrides(args)
    assert overrides == [
        "exp.checkpoint=c",
        "evaluation.per_image=True",
        "evaluation.worst_images=5",
    ]
    cfg = load_config(overrides)
    assert cfg.evaluation.per_image and cfg.evaluation.worst_images == 5
    assert eval_overrides(build_parser().parse_args(["eval", "split=val"])) == ["split=val"]
