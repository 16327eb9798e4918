"""Semantic check of captions against the true scenes of the synthetic dataset.

CIDEr can be high while shapes are wrong, so each generated caption is parsed back into objects
(:func:`hericap.data.synthetic.parse_caption`, exact on the generator's vocabulary) and compared
with the scene the image was rendered from:

* ``shape_f1`` / ``colour_f1``: per-image F1 of the multiset of shapes / colours (each object
  counted once per instance), averaged over images.
* ``count_acc``: share of images whose number of described objects equals the true number.
* ``relation_acc``: share of stated spatial relations that hold in the scene (both sides must
  name objects that exist); ``relations_checked`` says how many were stated.
* ``exact_scene``: share of images whose caption names exactly the true objects (shape, colour,
  count; size where stated) with every stated relation true.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from hericap.data.synthetic import ParsedCaption, Scene, parse_caption

__all__ = ["SEMANTIC_KEYS", "semantic_scores"]

SEMANTIC_KEYS = ("shape_f1", "colour_f1", "count_acc", "relation_acc", "exact_scene")
_RELATION_MIN_OFFSET = 0.05


def _f1(pred: Counter, true: Counter) -> float:
    if not pred and not true:
        return 1.0
    hit = sum((pred & true).values())
    if hit == 0:
        return 0.0
    p, r = hit / sum(pred.values()), hit / sum(true.values())
    return 2 * p * r / (p + r)


def _centroid(scene: Scene, shape: str, colour: str | None) -> tuple[float, float] | None:
    objs = [o for o in scene.objects if o.shape == shape and colour in (None, o.colour)]
    if not objs:
        return None
    return sum(o.x for o in objs) / len(objs), sum(o.y for o in objs) / len(objs)


def _relation_holds(scene: Scene, parsed: ParsedCaption, rel: tuple[int, str, int]) -> bool:
    a, name, b = rel
    pa, pb = parsed.objects[a], parsed.objects[b]
    ca, cb = _centroid(scene, pa.shape, pa.colour), _centroid(scene, pb.shape, pb.colour)
    if ca is None or cb is None:
        return False
    dx, dy = ca[0] - cb[0], ca[1] - cb[1]
    return {"above": -dy, "below": dy, "left": -dx, "right": dx}[name] >= _RELATION_MIN_OFFSET


def _image_scores(scene: Scene, caption: str) -> tuple[float, float, bool, int, int, bool]:
    parsed = parse_caption(caption)
    true_shapes = Counter(o.shape for o in scene.objects)
    true_colours = Counter(o.colour for o in scene.objects)
    pred_shapes: Counter = Counter()
    pred_colours: Counter = Counter()
    for o in parsed.objects:
        pred_shapes[o.shape] += o.count
        if o.colour is not None:
            pred_colours[o.colour] += o.count
    count_ok = sum(o.count for o in parsed.objects) == len(scene.objects)
    rel_ok = [_relation_holds(scene, parsed, r) for r in parsed.relations]
    true_kinds = Counter((o.shape, o.colour) for o in scene.objects)
    pred_kinds: Counter = Counter()
    for o in parsed.objects:
        pred_kinds[(o.shape, o.colour)] += o.count
    sizes_ok = all(
        o.size is None
        or any(
            t.shape == o.shape and t.colour == o.colour and t.size == o.size for t in scene.objects
        )
        for o in parsed.objects
    )
    exact = pred_kinds == true_kinds and sizes_ok and all(rel_ok)
    return (
        _f1(pred_shapes, true_shapes),
        _f1(pred_colours, true_colours),
        count_ok,
        sum(rel_ok),
        len(rel_ok),
        exact,
    )


def semantic_scores(
    scenes: Mapping[str, Scene], captions: Mapping[str, str]
) -> dict[str, float | int | None]:
    """Scores of one caption per image against the true scenes (keys: :data:`SEMANTIC_KEYS`
    plus ``relations_checked``; ``relation_acc`` is None when no relation was stated)."""
    if set(scenes) != set(captions):
        raise ValueError("scenes and captions must cover the same image ids")
    if not scenes:
        raise ValueError("nothing to score")
    rows = [_image_scores(scenes[k], captions[k]) for k in scenes]
    n = len(rows)
    rel_true = sum(r[3] for r in rows)
    rel_total = sum(r[4] for r in rows)
    return {
        "shape_f1": sum(r[0] for r in rows) / n,
        "colour_f1": sum(r[1] for r in rows) / n,
        "count_acc": sum(r[2] for r in rows) / n,
        "relation_acc": rel_true / rel_total if rel_total else None,
        "exact_scene": sum(r[5] for r in rows) / n,
        "relations_checked": rel_total,
    }
