"""The embedded synthetic dataset: determinism, variety, a real captioning task, exact parsing."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
from PIL import Image

from hericap.data import synthetic
from hericap.data.synthetic import COLOURS, SHAPES, SIZES, generate_sample, parse_caption
from hericap.evaluation.semantic import semantic_scores


def _samples(n: int, split: str = "train", seed: int = 0):
    return [generate_sample(seed, split, i) for i in range(n)]


def test_deterministic_by_seed_and_index():
    a, b = generate_sample(3, "train", 17), generate_sample(3, "train", 17)
    assert a.jpeg == b.jpeg and a.captions == b.captions and a.scene == b.scene
    c = generate_sample(4, "train", 17)
    assert c.jpeg != a.jpeg
    assert generate_sample(3, "val", 17).jpeg != a.jpeg


def test_vocabulary_size_requirements():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8 and len(SIZES) == 2


def test_scene_statistics_cover_the_space():
    samples = _samples(400)
    objects = [o for s in samples for o in s.scene.objects]
    counts = Counter(len(s.scene.objects) for s in samples)
    assert set(counts) == {1, 2, 3}
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert len({s.scene.background for s in samples}) >= 3
    # positions vary over the whole canvas
    xs = np.array([o.x for o in objects])
    assert xs.min() < 0.25 and xs.max() > 0.75


def test_five_distinct_captions_with_patterns_counts_and_relations():
    samples = _samples(300)
    for s in samples:
        assert len(s.captions) == 5 and len(set(s.captions)) == 5
    text = " ".join(c for s in samples for c in s.captions)
    for word in ("two", "three", "above", "below", "left", "right", "background", "there"):
        assert word in text.split(), word
    # at least 3 sentence patterns: relation, list and background forms all occur
    has_rel = any(
        w in c.split()
        for s in samples
        for c in s.captions
        for w in ("above", "below", "left", "right", "over", "under")
    )
    has_bg = any(c.endswith("background") for s in samples for c in s.captions)
    has_list = any(
        " and " in c and not c.endswith("background") for s in samples for c in s.captions
    )
    assert has_rel and has_bg and has_list


def test_synonyms_used():
    text = Counter(w for s in _samples(300) for c in s.captions for w in c.split())
    for a, b in (("circle", "disk"), ("large", "big"), ("purple", "violet")):
        assert text[a] > 0 and text[b] > 0


def test_images_decode_and_show_the_objects():
    s = generate_sample(0, "train", 5)
    img = np.asarray(Image.open(io.BytesIO(s.jpeg)).convert("RGB")).astype(int)
    assert img.shape == (64, 64, 3)
    obj = s.scene.objects[0]
    y, x = int(obj.y * 64), int(obj.x * 64)
    target = np.array(COLOURS[obj.colour][0])
    # the object's colour is found at its centre region (not the background)
    patch = img[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].reshape(-1, 3)
    assert np.abs(patch - target).sum(1).min() < 90


def test_captions_depend_on_the_image_not_a_lookup():
    # Different images almost never share a caption set, and the same caption text can belong
    # to visually different scenes only if it names the same objects.
    samples = _samples(300)
    caption_sets = {tuple(sorted(s.captions)) for s in samples}
    assert len(caption_sets) == len(samples)
    # what is in the picture varies: most scenes are unique, none dominates (no prior to learn)
    kinds = Counter(tuple(sorted((o.shape, o.colour) for o in s.scene.objects)) for s in samples)
    assert len(kinds) >= 0.6 * len(samples)
    assert max(kinds.values()) <= 0.03 * len(samples)


def test_parser_recovers_every_true_scene_from_ground_truth():
    samples = _samples(200, split="test")
    scenes = {s.image_id: s.scene for s in samples}
    for j in range(5):
        scores = semantic_scores(scenes, {s.image_id: s.captions[j] for s in samples})
        assert scores["shape_f1"] == 1.0 and scores["colour_f1"] == 1.0
        assert scores["count_acc"] == 1.0 and scores["exact_scene"] == 1.0
        assert scores["relation_acc"] == 1.0 and scores["relations_checked"] > 20


def test_semantic_check_catches_wrong_captions():
    s = next(x for x in _samples(50) if len(x.scene.objects) == 1)
    obj = s.scene.objects[0]
    other_shape = next(k for k in SHAPES if k != obj.shape)
    wrong = f"a {obj.colour} {other_shape}"
    scores = semantic_scores({s.image_id: s.scene}, {s.image_id: wrong})
    assert scores["shape_f1"] == 0.0 and scores["colour_f1"] == 1.0
    assert scores["exact_scene"] == 0.0 and scores["count_acc"] == 1.0


def test_parse_caption_counts_and_relations():
    parsed = parse_caption("two small red circles above a blue square and one big green star")
    assert [(o.shape, o.colour, o.size, o.count) for o in parsed.objects] == [
        ("circle", "red", "small", 2),
        ("square", "blue", None, 1),
        ("star", "green", "large", 1),
    ]
    assert parsed.relations == [(0, "above", 1)]
    assert parse_caption("a picture of three violet rhombuses to the left of a disk").relations == [
        (0, "left", 1)
    ]


def test_iter_split_matches_generate_sample():
    items = list(synthetic.iter_split(1, "val", 3))
    assert [i.image_id for i in items] == [f"synthetic-val-{k:06d}" for k in range(3)]
    assert items[2].jpeg == generate_sample(1, "val", 2).jpeg
