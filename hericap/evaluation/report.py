"""The score report of a split: model vs references, model vs the oracle's references, the human
oracle, and (synthetic data) the semantic check; and its table for terminals."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hericap.data.synthetic import Scene
from hericap.evaluation.coco_metrics import METRIC_KEYS, CocoScorer
from hericap.evaluation.semantic import SEMANTIC_KEYS, semantic_scores

__all__ = ["build_report", "format_phase_comparison", "format_table"]


def build_report(
    scorer: CocoScorer,
    references: Mapping[str, list[str]],
    candidates: Mapping[str, str],
    scenes: Mapping[str, Scene] | None = None,
    with_oracle: bool = True,
) -> dict[str, Any]:
    """Scores of ``candidates`` (one caption per image) on one split.

    * ``metrics``: model vs all references;
    * ``metrics_4ref``: model vs each image's references but the first;
    * ``oracle``: the first reference vs the others (the human ceiling on the same references
      as ``metrics_4ref``, so the two compare like with like);
    * ``semantic`` / ``oracle_semantic``: the synthetic semantic check (None without scenes).

    Images with fewer than two references take part in ``metrics`` only. ``with_oracle=False``
    leaves ``oracle`` / ``oracle_semantic`` None (a second checkpoint on the same split: the
    oracle does not change, and scoring it again costs a toolkit run).
    """
    metrics = scorer.score(references, candidates)
    multi = {k: list(v) for k, v in references.items() if len(v) >= 2}
    metrics_4ref = oracle = None
    if multi:
        rest = {k: v[1:] for k, v in multi.items()}
        metrics_4ref = scorer.score(rest, {k: candidates[k] for k in multi})
        if with_oracle:
            oracle = scorer.score(rest, {k: v[0] for k, v in multi.items()})
    semantic = oracle_semantic = None
    if scenes:
        semantic = semantic_scores(scenes, {k: candidates[k] for k in scenes})
        if with_oracle:
            oracle_semantic = semantic_scores(scenes, {k: references[k][0] for k in scenes})
    return {
        "num_images": len(candidates),
        "num_images_multi_ref": len(multi),
        "metrics": metrics,
        "metrics_4ref": metrics_4ref,
        "oracle": oracle,
        "semantic": semantic,
        "oracle_semantic": oracle_semantic,
        "spice_status": scorer.spice.reason,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_table(report: Mapping[str, Any]) -> str:
    """A plain-text table of a report (metrics side by side, then the semantic check)."""
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
    if report.get("metrics", {}).get("SPICE") is None:
        lines.append(f"(SPICE n/a: {report.get('spice_status')})")
    if report.get("semantic"):
        lines.append("")
        lines.append(f"{'semantic':<14}{'model':>10}{'oracle':>10}")
        for key in (*SEMANTIC_KEYS, "relations_checked"):
            lines.append(
                f"{key:<14}{_fmt(report['semantic'].get(key)):>10}"
                f"{_fmt(report['oracle_semantic'].get(key)):>10}"
            )
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
    for key in ("shape_f1", "colour_f1", "count_acc", "exact_scene"):
        if xe.get("semantic") and final.get("semantic"):
            lines.append(
                f"{key:<14}{_fmt(xe['semantic'].get(key)):>10}"
                f"{_fmt(final['semantic'].get(key)):>40}"
            )
    return "\n".join(lines)
