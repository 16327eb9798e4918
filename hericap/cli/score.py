"""``hericap score``: a COCO results file scored with the coco-caption toolkit."""

from __future__ import annotations

import argparse
import json
import logging

logger = logging.getLogger(__name__)


def cmd_score(args: argparse.Namespace) -> int:
    from hericap.evaluation.coco_files import load_annotations, load_results, references_for
    from hericap.evaluation.coco_metrics import METRIC_KEYS, CocoScorer

    results = load_results(args.results)
    references = references_for(results, load_annotations(args.annotations))
    with CocoScorer(meteor=not args.no_meteor, spice_jars=args.spice_jars) as scorer:
        metrics = scorer.score(references, results)
        spice = scorer.spice
    print(f"{len(results)} images, {sum(len(v) for v in references.values())} references")
    for key in METRIC_KEYS:
        value = metrics[key]
        print(f"  {key:<9}{'unavailable' if value is None else f'{value:.4f}'}")
    if not spice.available:
        print(f"  (SPICE unavailable: {spice.reason})")
    if args.json:
        print(json.dumps(metrics))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``score`` command."""
    sc = sub.add_parser("score", help="score a COCO results file against COCO annotations")
    sc.add_argument("--results", required=True, help="[{image_id, caption}] JSON")
    sc.add_argument("--annotations", required=True, help="COCO caption annotations JSON")
    sc.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    sc.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a JVM)")
    sc.add_argument("--spice-jars", default=None, help="folder of the CoreNLP 3.6.0 jars")
    sc.set_defaults(func=cmd_score)
