"""The embedded synthetic captioning dataset: rendered shape scenes with varied captions.

Each image shows 1–3 objects (7 shapes × 8 colours × 2 sizes) at random positions over a varied
background. Its five captions come from four sentence patterns (a list, a spatial relation, the
inverse relation, a background description) with synonyms, counts and optional sizes, so the
captions of one image differ and only the pixels say what to write. Each image keeps its true
scene (objects with shape, colour, size, position; group relations).

Because the captions use a closed vocabulary, :func:`parse_caption` reads a caption back into
objects and relations exactly; :mod:`hericap.evaluation.semantic` uses that to check a model's
captions against the true scene.

Everything is deterministic given the seed: image ``i`` of a split is generated from
``(seed, split, i)`` alone, so shards can be written in any order or in parallel.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "GENERATOR_VERSION",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "ParsedCaption",
    "Scene",
    "SceneObject",
    "SyntheticSample",
    "generate_sample",
    "iter_split",
    "parse_caption",
]

# Canonical name -> synonyms used in captions (singular, plural).
SHAPES: dict[str, list[tuple[str, str]]] = {
    "circle": [("circle", "circles"), ("disk", "disks")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "star": [("star", "stars")],
    "cross": [("cross", "crosses"), ("plus", "pluses")],
    "heart": [("heart", "hearts")],
}
COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "red": ((220, 30, 30), ["red"]),
    "orange": ((245, 135, 0), ["orange"]),
    "yellow": ((240, 220, 20), ["yellow"]),
    "green": ((30, 165, 45), ["green"]),
    "cyan": ((0, 205, 215), ["cyan", "turquoise"]),
    "blue": ((35, 60, 225), ["blue"]),
    "purple": ((140, 40, 190), ["purple", "violet"]),
    "pink": ((255, 110, 185), ["pink"]),
}
SIZES: dict[str, tuple[float, list[str]]] = {
    # radius as a fraction of the image side (at 64 px: 15 and 26 px across)
    "small": (0.12, ["small", "little", "tiny"]),
    "large": (0.2, ["large", "big"]),
}
# relation -> (phrases, inverse relation)
RELATIONS: dict[str, tuple[list[str], str]] = {
    "above": (["above", "over"], "below"),
    "below": (["below", "under", "beneath"], "above"),
    "left": (["to the left of", "left of"], "right"),
    "right": (["to the right of", "right of"], "left"),
}
COUNT_WORDS = {1: ["a", "one"], 2: ["two"], 3: ["three"]}
# Bump whenever generated images or captions change, so cached shards are regenerated.
GENERATOR_VERSION = 2
BACKGROUND_TONES = {"dark": ["dark"], "light": ["light", "pale"], "gray": ["gray", "grey"]}

_RELATION_MIN_OFFSET = 0.12  # fraction of the image side
_RELATION_DOMINANCE = 1.5  # dominant axis offset / other axis offset


@dataclass
class SceneObject:
    """One rendered object; ``x``, ``y`` (centre) and ``r`` are fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: float


@dataclass
class Scene:
    """The true content of an image."""

    objects: list[SceneObject]
    # Groups of identical objects (same shape, colour, size), as indices into ``objects``.
    groups: list[list[int]]
    # Unambiguous relations between groups: (subject group, relation, object group).
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    background: str = "gray"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            objects=[SceneObject(**o) for o in d["objects"]],
            groups=[list(g) for g in d["groups"]],
            relations=[tuple(r) for r in d.get("relations", [])],
            background=d.get("background", "gray"),
        )


@dataclass
class SyntheticSample:
    image_id: str
    split: str
    jpeg: bytes
    width: int
    height: int
    captions: list[str]
    scene: Scene


def _rng_for(seed: int, split: str, index: int) -> random.Random:
    digest = hashlib.sha256(f"hericap-synthetic/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# --- scene sampling -----------------------------------------------------------------------------


def _sample_group_sizes(rng: random.Random) -> list[int]:
    n = rng.choice([1, 2, 3])
    if n == 1:
        return [1]
    if n == 2:
        return [2] if rng.random() < 0.35 else [1, 1]
    u = rng.random()
    if u < 0.15:
        return [3]
    if u < 0.45:
        return [2, 1]
    return [1, 1, 1]


def _place(rng: random.Random, r: float, placed: list[SceneObject]) -> tuple[float, float] | None:
    margin = r + 0.03
    for _ in range(200):
        x = rng.uniform(margin, 1 - margin)
        y = rng.uniform(margin, 1 - margin)
        if all(math.hypot(x - o.x, y - o.y) > r + o.r + 0.03 for o in placed):
            return x, y
    return None


def _group_relation(scene: Scene, a: int, b: int) -> str | None:
    """The unambiguous relation of group ``a`` to group ``b``, or None."""
    ax, ay = _centroid(scene, scene.groups[a])
    bx, by = _centroid(scene, scene.groups[b])
    dx, dy = ax - bx, ay - by
    if abs(dy) >= _RELATION_MIN_OFFSET and abs(dy) >= _RELATION_DOMINANCE * abs(dx):
        return "above" if dy < 0 else "below"
    if abs(dx) >= _RELATION_MIN_OFFSET and abs(dx) >= _RELATION_DOMINANCE * abs(dy):
        return "left" if dx < 0 else "right"
    return None


def _centroid(scene: Scene, members: list[int]) -> tuple[float, float]:
    xs = [scene.objects[i].x for i in members]
    ys = [scene.objects[i].y for i in members]
    return sum(xs) / len(xs), sum(ys) / len(ys)


def _sample_scene(rng: random.Random) -> Scene:
    while True:
        group_sizes = _sample_group_sizes(rng)
        kinds: list[tuple[str, str]] = []
        while len(kinds) < len(group_sizes):
            kind = (rng.choice(list(SHAPES)), rng.choice(list(COLOURS)))
            if kind not in kinds:  # groups differ in (shape, colour)
                kinds.append(kind)
        objects: list[SceneObject] = []
        groups: list[list[int]] = []
        ok = True
        for count, (shape, colour) in zip(group_sizes, kinds, strict=True):
            # Crowded scenes use small objects more often so that everything fits.
            size = (
                rng.choice(["small", "large"])
                if len(group_sizes) < 3 or count > 1
                else ("large" if rng.random() < 0.3 else "small")
            )
            r = SIZES[size][0]
            members = []
            for _ in range(count):
                pos = _place(rng, r, objects)
                if pos is None:
                    ok = False
                    break
                members.append(len(objects))
                objects.append(SceneObject(shape, colour, size, pos[0], pos[1], r))
            if not ok:
                break
            groups.append(members)
        if not ok:
            continue
        scene = Scene(objects=objects, groups=groups)
        for a in range(len(groups)):
            for b in range(len(groups)):
                rel = _group_relation(scene, a, b) if a != b else None
                if rel is not None:
                    scene.relations.append((a, rel, b))
        scene.background = rng.choice(list(BACKGROUND_TONES))
        return scene


# --- rendering ----------------------------------------------------------------------------------


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(phase + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = r, r * 0.36
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise ValueError(f"no polygon for shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.r * side
    fill = COLOURS[obj.colour][0]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "heart":
        lobe = r * 0.5
        draw.ellipse([cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe], fill=fill)
        draw.ellipse([cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe], fill=fill)
        draw.polygon(
            [(cx - 1.95 * lobe, cy - r * 0.1), (cx + 1.95 * lobe, cy - r * 0.1), (cx, cy + r)],
            fill=fill,
        )
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)


def _background(rng: random.Random, tone: str, side: int) -> Image.Image:
    level = {
        "dark": rng.uniform(35, 80),
        "gray": rng.uniform(105, 150),
        "light": rng.uniform(185, 235),
    }[tone]
    tint = [rng.uniform(-12, 12) for _ in range(3)]
    top = [max(0, min(255, level + t)) for t in tint]
    delta = rng.uniform(-25, 25)
    bottom = [max(0, min(255, c + delta)) for c in top]
    horizontal = rng.random() < 0.5
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    for i in range(side):
        a = i / max(1, side - 1)
        colour = tuple(round(t * (1 - a) + b * a) for t, b in zip(top, bottom, strict=True))
        if horizontal:
            draw.line([(i, 0), (i, side)], fill=colour)
        else:
            draw.line([(0, i), (side, i)], fill=colour)
    # A few faint blobs make backgrounds differ beyond a gradient.
    for _ in range(rng.randint(0, 4)):
        x, y, rr = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(0.05, 0.2) * side
        shade = tuple(int(max(0, min(255, c + rng.uniform(-15, 15)))) for c in top)
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=shade)
    return img


def render_scene(scene: Scene, rng: random.Random, image_size: int) -> Image.Image:
    """Render at twice the size and downsample, for smooth edges."""
    side = image_size * 2
    img = _background(rng, scene.background, side)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, side)
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


# --- captions -----------------------------------------------------------------------------------


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, scene: Scene, group: int) -> str:
    members = scene.groups[group]
    obj = scene.objects[members[0]]
    count = len(members)
    singular, plural = rng.choice(SHAPES[obj.shape])
    words = []
    if rng.random() < 0.7:
        words.append(rng.choice(SIZES[obj.size][1]))
    words.append(rng.choice(COLOURS[obj.colour][1]))
    words.append(singular if count == 1 else plural)
    count_word = rng.choice(COUNT_WORDS[count])
    if count_word == "a":
        count_word = _article(words[0])
    return " ".join([count_word, *words])


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _intro(rng: random.Random, first_count: int) -> str:
    options = [
        "",
        "an image of",
        "a picture of",
        "a photo showing",
        "there is" if first_count == 1 else "there are",
    ]
    return rng.choice(options)


def _caption(rng: random.Random, scene: Scene) -> str:
    patterns = ["list", "background"]
    if scene.relations:
        patterns += ["relation", "relation_inverse"]
    pattern = rng.choice(patterns)
    order = list(range(len(scene.groups)))
    rng.shuffle(order)
    if pattern in ("relation", "relation_inverse"):
        a, rel, b = rng.choice(scene.relations)
        if pattern == "relation_inverse":
            a, b, rel = b, a, RELATIONS[rel][1]
        rest = [g for g in order if g not in (a, b)]
        text = (
            f"{_noun_phrase(rng, scene, a)} {rng.choice(RELATIONS[rel][0])} "
            f"{_noun_phrase(rng, scene, b)}"
        )
        if rest:
            text += " and " + _join([_noun_phrase(rng, scene, g) for g in rest])
        first = len(scene.groups[a])
    else:
        text = _join([_noun_phrase(rng, scene, g) for g in order])
        first = len(scene.groups[order[0]])
        if pattern == "background":
            tone = rng.choice(BACKGROUND_TONES[scene.background])
            text += f" on {_article(tone)} {tone} background"
    intro = _intro(rng, first)
    return f"{intro} {text}".strip()


def _captions(rng: random.Random, scene: Scene, n: int = 5) -> list[str]:
    captions: list[str] = []
    for _ in range(100 * n):
        c = _caption(rng, scene)
        if c not in captions:
            captions.append(c)
        if len(captions) == n:
            return captions
    raise RuntimeError(f"could not produce {n} distinct captions for scene {scene}")


def generate_sample(seed: int, split: str, index: int, image_size: int = 64) -> SyntheticSample:
    """Generate image ``index`` of ``split`` deterministically from ``seed``."""
    rng = _rng_for(seed, split, index)
    scene = _sample_scene(rng)
    image = render_scene(scene, rng, image_size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return SyntheticSample(
        image_id=f"synthetic-{split}-{index:06d}",
        split=split,
        jpeg=buf.getvalue(),
        width=image_size,
        height=image_size,
        captions=_captions(rng, scene),
        scene=scene,
    )


def iter_split(
    seed: int, split: str, num_images: int, image_size: int = 64, start: int = 0
) -> Iterator[SyntheticSample]:
    """Samples ``start .. num_images - 1`` of a split."""
    for i in range(start, num_images):
        yield generate_sample(seed, split, i, image_size=image_size)


# --- parsing captions back into scenes ----------------------------------------------------------

_SHAPE_WORDS = {w: canon for canon, syns in SHAPES.items() for pair in syns for w in pair}
_PLURAL_WORDS = {pl for syns in SHAPES.values() for _, pl in syns}
_COLOUR_WORDS = {w: canon for canon, (_, syns) in COLOURS.items() for w in syns}
_SIZE_WORDS = {w: canon for canon, (_, syns) in SIZES.items() for w in syns}
_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_RELATION_WORDS = {
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "left": "left",
    "right": "right",
}


@dataclass
class ParsedObject:
    shape: str
    colour: str | None
    size: str | None
    count: int


@dataclass
class ParsedCaption:
    objects: list[ParsedObject]
    # (subject object index, relation, object index) into ``objects``.
    relations: list[tuple[int, str, int]]


def parse_caption(caption: str) -> ParsedCaption:
    """Read a caption in the synthetic vocabulary back into objects and relations.

    Unknown words are ignored, so the parser also reads (imperfect) model output: an adjective
    without a shape noun is dropped, a plural without a count word counts as two.
    """
    words = caption.lower().replace(",", " ").split()
    objects: list[ParsedObject] = []
    relations: list[tuple[int, str, int]] = []
    count = colour = size = None
    pending_relation: tuple[int, str] | None = None
    for w in words:
        if w in _COUNT_WORDS:
            count = _COUNT_WORDS[w]
        elif w in _SIZE_WORDS:
            size = _SIZE_WORDS[w]
        elif w in _COLOUR_WORDS:
            colour = _COLOUR_WORDS[w]
        elif w in _SHAPE_WORDS:
            n = count if count is not None else (2 if w in _PLURAL_WORDS else 1)
            objects.append(ParsedObject(_SHAPE_WORDS[w], colour, size, n))
            if pending_relation is not None:
                relations.append((pending_relation[0], pending_relation[1], len(objects) - 1))
                pending_relation = None
            count = colour = size = None
        elif w in _RELATION_WORDS and objects:
            pending_relation = (len(objects) - 1, _RELATION_WORDS[w])
    return ParsedCaption(objects=objects, relations=relations)
