"""The score report of a split: model vs references, model vs the oracle's references, the human
oracle, per-domain scores (nocaps), the diversity of the captions (model and oracle), and
(synthetic data) the semantic check; and its tables for terminals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hericap.data.synthetic import Scene
from hericap.evaluation.coco_metrics import METRIC_KEYS, CocoScorer
from hericap.evaluation.diversity import DIVERSITY_KEYS, diversity_scores
from hericap.evaluation.semantic import SEMANTIC_KEYS, semantic_scores

__all__ = [
    "NO_REFERENCES",
    "build_report",
    "format_phase_comparison",
    "format_table",
    "format_worst",
]

# Why a split without references (nocaps test, COCO test2014) has no scores.
NO_REFERENCES = (
    "this split has no reference captions (nocaps test, COCO test2014): its captions are "
    "written for the evaluation server instead"
)


def build_report(
    scorer: CocoScorer,
    references: Mapping[str, list[str]],
    candidates: Mapping[str, str],
    scenes: Mapping[str, Scene] | None = None,
    with_oracle: bool = True,
    *,
    groups: Mapping[str, str] | None = None,
    train_fingerprints: np.ndarray | None = None,
    collapse_unique_share: float = 0.0,
    per_image: bool = False,
) -> dict[str, Any]:
    """Scores of ``candidates`` (one caption per image) on one split.

    * ``metrics``: model vs all references;
    * ``metrics_4ref``: model vs each image's references but the first;
    * ``oracle``: the first reference vs the others (the human ceiling on the same references
      as ``metrics_4ref``, so the two compare like with like);
    * ``domains``: with ``groups`` (``{image_id: domain}``, nocaps), each domain's scores on its
      images alone (``metrics`` is the overall score), and ``domain_images``;
    * ``diversity`` / ``oracle_diversity``: :func:`~hericap.evaluation.diversity.diversity_scores`
      of the model's captions and of the first references (``novel_share`` against
      ``train_fingerprints``);
    * ``semantic`` / ``oracle_semantic``: the synthetic semantic check (None without scenes);
    * ``per_image`` (only when asked): ``{image_id: every metric}``, for a file of its own.

    Images with fewer than two references take part in ``metrics`` only. ``with_oracle=False``
    leaves ``oracle`` / ``oracle_semantic`` / ``oracle_diversity`` None (a second checkpoint on
    the same split: the oracle does not change, and scoring it again costs a toolkit run). A
    split without any reference gets no toolkit scores (``metrics_status`` says why).
    """
    report: dict[str, Any] = {
        "num_images": len(candidates),
        "diversity": diversity_scores(candidates, train_fingerprints, collapse_unique_share),
        "spice_status": scorer.spice.reason,
    }
    if groups:
        report["domain_images"] = _counts(groups, candidates)
    if not any(references.values()):
        return report | _unscored()
    # one Java tokenisation for every score below (the oracle's captions are references)
    gts, res = scorer.tokenize_pair(references, candidates)
    scores = scorer.evaluate_tokenized(gts, res, groups)
    multi = [k for k, v in references.items() if len(v) >= 2]
    metrics_4ref = oracle = oracle_diversity = None
    if multi:
        rest = {k: gts[k][1:] for k in multi}
        metrics_4ref = scorer.evaluate_tokenized(rest, {k: res[k] for k in multi}).corpus
        if with_oracle:
            oracle = scorer.evaluate_tokenized(rest, {k: gts[k][:1] for k in multi}).corpus
            firsts = {k: references[k][0] for k in multi}
            oracle_diversity = diversity_scores(firsts, train_fingerprints, collapse_unique_share)
    semantic = oracle_semantic = None
    if scenes:
        semantic = semantic_scores(scenes, {k: candidates[k] for k in scenes})
        if with_oracle:
            oracle_semantic = semantic_scores(scenes, {k: references[k][0] for k in scenes})
    report |= {
        "num_images_multi_ref": len(multi),
        "metrics": scores.corpus,
        "metrics_4ref": metrics_4ref,
        "oracle": oracle,
        "oracle_diversity": oracle_diversity,
        "semantic": semantic,
        "oracle_semantic": oracle_semantic,
    }
    if groups:
        report["domains"] = scores.groups
    if per_image:
        report["per_image"] = scores.per_image
    return report


def _counts(groups: Mapping[str, str], candidates: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for k in candidates:
        counts[groups[k]] = counts.get(groups[k], 0) + 1
    return dict(sorted(counts.items()))


def _unscored() -> dict[str, Any]:
    return {
        "num_images_multi_ref": 0,
        "metrics": None,
        "metrics_status": NO_REFERENCES,
        "metrics_4ref": None,
        "oracle": None,
        "oracle_diversity": None,
        "semantic": None,
        "oracle_semantic": None,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of a report: metrics side by side, per-domain scores, CLIPScore,
    the diversity of the model's and the oracle's captions, then the semantic check."""
    if not report.get("metrics"):
        lines = [f"no scores: {report.get('metrics_status', 'no metrics in this report')}"]
    else:
        lines = _metric_lines(report)
    if report.get("domains"):
        lines += ["", *_domain_lines(report)]
    if report.get("clip"):
        lines += ["", *_clip_lines(report["clip"])]
    if report.get("diversity"):
        lines += ["", *_diversity_lines(report)]
    if report.get("semantic"):
        lines.append("")
        lines.append(f"{'semantic':<14}{'model':>10}{'oracle':>10}")
        for key in (*SEMANTIC_KEYS, "relations_checked"):
            lines.append(
                f"{key:<14}{_fmt(report['semantic'].get(key)):>10}"
                f"{_fmt(report['oracle_semantic'].get(key)):>10}"
            )
    return "\n".join(lines)


def _metric_lines(report: Mapping[str, Any]) -> list[str]:
    cols = [
        ("model (all refs)", report.get("metrics")),
        ("model (4 refs)", report.get("metrics_4ref")),
        ("human oracle (4 refs)", report.get("oracle")),
    ]
    cols = [(name, m) for name, m in cols if m]
    width = max(len(c[0]) for c in cols) + 2
    lines = [f"{'metric':<10}" + "".join(f"{name:>{width}}" for name, _ in cols)]
    for key in METRIC_KEYS:
        lines.append(f"{key:<10}" + "".join(f"{_fmt(m.get(key)):>{width}}" for _, m in cols))
    if report["metrics"].get("SPICE") is None:
        lines.append(f"(SPICE n/a: {report.get('spice_status')})")
    return lines


def _domain_lines(report: Mapping[str, Any]) -> list[str]:
    domains = report["domains"]
    counts = report.get("domain_images", {})
    names = [*domains, "overall"]
    scores = {**domains, "overall": report["metrics"]}
    lines = [f"{'domain':<10}" + "".join(f"{n:>13}" for n in names)]
    lines.append(
        f"{'images':<10}"
        + "".join(
            f"{counts.get(n, report['num_images'] if n == 'overall' else ''):>13}" for n in names
        )
    )
    for key in ("CIDEr", "SPICE", "Bleu_4", "METEOR"):
        lines.append(f"{key:<10}" + "".join(f"{_fmt(scores[n].get(key)):>13}" for n in names))
    return lines


def _clip_lines(clip: Mapping[str, Any]) -> list[str]:
    if not clip.get("available"):
        return [f"(CLIPScore / RefCLIPScore n/a: {clip.get('status')})"]
    return [
        f"{'CLIPScore':<14}{_fmt(clip.get('CLIPScore')):>10}",
        f"{'RefCLIPScore':<14}{_fmt(clip.get('RefCLIPScore')):>10}  ({clip.get('model')})",
    ]


def _diversity_lines(report: Mapping[str, Any]) -> list[str]:
    model, oracle = report["diversity"], report.get("oracle_diversity")
    lines = [f"{'diversity':<14}{'model':>10}" + (f"{'oracle':>10}" if oracle else "")]
    for key in DIVERSITY_KEYS:
        row = f"{key:<14}{_fmt(model.get(key)):>10}"
        lines.append(row + (f"{_fmt(oracle.get(key)):>10}" if oracle else ""))
    if model.get("collapse"):
        lines.append(
            f"COLLAPSE: unique captions below evaluation.collapse_unique_share="
            f"{model['collapse_unique_share']}"
        )
    return lines


def format_worst(worst: list[Mapping[str, Any]], metric: str = "CIDEr") -> str:
    """The worst images of a per-image file, one line each: id, score, caption, a reference."""
    lines = [f"{len(worst)} worst images by {metric}:"]
    for row in worst:
        refs = row.get("references") or [""]
        lines.append(f"  {row['image_id']:>12}  {_fmt(row.get(metric)):>7}  {row['caption']!r}")
        lines.append(f"  {'':>12}  {'ref':>7}  {refs[0]!r}")
    return "\n".join(lines)


def format_phase_comparison(xe: Mapping[str, Any], final: Mapping[str, Any]) -> str:
    """Test scores of the best XE checkpoint next to the final (SCST) one."""
    reward = (final.get("training") or {}).get("reward") or {}
    head = "SCST" + (
        f" ({reward.get('baseline')}, <eos> {'in' if reward.get('include_eos') else 'NOT in'}"
        " reward)"
        if reward
        else ""
    )
    lines = [f"{'test':<14}{'XE':>10}{head:>40}"]
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        lines.append(
            f"{key:<14}{_fmt(xe['metrics'].get(key)):>10}{_fmt(final['metrics'].get(key)):>40}"
        )
    for key in ("distinct_2", "unique_share"):  # SCST tends to narrow the captions
        if xe.get("diversity") and final.get("diversity"):
            lines.append(
                f"{key:<14}{_fmt(xe['diversity'].get(key)):>10}"
                f"{_fmt(final['diversity'].get(key)):>40}"
            )
    for key in ("shape_f1", "colour_f1", "count_acc", "exact_scene"):
        if xe.get("semantic") and final.get("semantic"):
            lines.append(
                f"{key:<14}{_fmt(xe['semantic'].get(key)):>10}"
                f"{_fmt(final['semantic'].get(key)):>40}"
            )
    return "\n".join(lines)
