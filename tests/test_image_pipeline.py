"""Resizing (square and the paper's max-side rule), padded canvases, caption-safe augmentation,
and the Ray Data pipeline on real photos of mixed aspect ratios."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import decode_image
from PIL import Image

from hericap.config import load_config
from hericap.data.augment import AUGMENT_OPS, RandAugment, train_augmentation
from hericap.data.transforms import (
    MEAN_RGB,
    ResizeSpec,
    crop_batch,
    load_image,
    normalize_images,
    resize_spec,
    resize_to_canvas,
)

PAPER = ResizeSpec(mode="max_side", min_size=384, max_size=640)


def _photo(width: int, height: int) -> Image.Image:
    """A gradient with a red block at the top left, so orientation and cropping show."""
    x = np.linspace(0, 255, width, dtype=np.uint8)
    arr = np.stack(np.broadcast_arrays(x[None, :], x[None, :] // 2, 90 * np.ones((height, 1))), -1)
    arr = arr.astype(np.uint8)
    arr[: height // 4, : width // 4] = (255, 0, 0)
    return Image.fromarray(arr)


def _jpeg(im: Image.Image) -> bytes:
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=95)
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 500), (640, 320)),  # landscape 2:1: the long side caps
        ((500, 1000), (320, 640)),  # portrait 1:2
        ((640, 480), (512, 384)),  # COCO's usual 4:3: the short side caps
        ((500, 375), (512, 384)),  # smaller than the target: scaled up to it
        ((384, 640), (384, 640)),  # already there
    ],
)
def test_max_side_rule_keeps_aspect_and_caps_both_sides(size, expected):
    assert PAPER.target_size(*size) == expected
    assert PAPER.canvas == (640, 640) and PAPER.model_size == (384, 640)
    assert ResizeSpec(size=64).target_size(*size) == (64, 64)


def test_resize_pads_onto_the_canvas_with_the_mean_and_reports_the_real_size():
    canvas, (h, w) = resize_to_canvas(_photo(1000, 500), PAPER)
    assert canvas.shape == (640, 640, 3) and (h, w) == (320, 640)
    assert (canvas[h:] == MEAN_RGB).all()
    # the mean colour is zero after normalisation, to within uint8 rounding
    assert normalize_images(canvas[None, h:]).abs().max() < 0.01
    assert canvas[:10, :10].mean(axis=(0, 1))[0] > 200  # the red block stayed at the top left


def test_crop_batch_trims_to_the_largest_image_rounded_to_the_stride():
    images = np.zeros((3, 640, 640, 3), dtype=np.uint8)
    sizes = np.array([[384, 512], [320, 640], [300, 400]])
    assert crop_batch(images, sizes, multiple=64).shape == (3, 384, 640, 3)
    assert crop_batch(images, np.array([[100, 130]]), multiple=64).shape == (3, 128, 192, 3)
    assert crop_batch(images, None).shape == images.shape


def test_decode_image_keeps_square_behaviour_for_an_int():
    arr = decode_image(_jpeg(_photo(90, 60)), 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_resize_spec_follows_the_config_and_bad_values_are_errors():
    cfg = load_config(["preset=demo", "dataset.resize=max_side", "dataset.max_size=800"])
    spec = resize_spec(cfg.dataset)
    assert (spec.mode, spec.min_size, spec.max_size) == ("max_side", 384, 800)
    with pytest.raises(ValueError, match=r"dataset.resize='crop'.*square.*max_side"):
        load_config(["preset=demo", "dataset.resize=crop"])
    with pytest.raises(ValueError, match=r"dataset.augment='autoaug'.*randaugment"):
        load_config(["preset=demo", "dataset.augment=autoaug"])
    with pytest.raises(ValueError, match="min_size <= max_size"):
        load_config(["preset=demo", "dataset.min_size=700"])


def test_paper_preset_uses_the_max_side_rule_and_augmentation():
    cfg = load_config(["preset=paper"])
    assert (cfg.dataset.resize, cfg.dataset.min_size, cfg.dataset.max_size) == (
        "max_side",
        384,
        640,
    )
    assert cfg.dataset.augment == "randaugment"
    demo = load_config(["preset=demo"])
    assert demo.dataset.resize == "square" and demo.dataset.augment == "none"


def test_randaugment_is_seeded_changes_pixels_and_keeps_the_size():
    im = _photo(96, 64)
    aug = RandAugment(num_ops=2, magnitude=9)
    a = np.asarray(aug(im, np.random.default_rng(3)))
    b = np.asarray(aug(im, np.random.default_rng(3)))
    assert np.array_equal(a, b) and a.shape == (64, 96, 3)
    outs = [np.asarray(aug(im, np.random.default_rng(s))) for s in range(8)]
    assert any(not np.array_equal(o, np.asarray(im)) for o in outs)


@pytest.mark.parametrize("op", sorted(AUGMENT_OPS))
def test_every_op_keeps_left_and_right(op):
    """No op may mirror the image: the red block (top left) stays in the left half."""
    im = _photo(96, 64)
    out = np.asarray(AUGMENT_OPS[op](im, 1.0, np.random.default_rng(0))).astype(int)
    redness = out[..., 0] - out[..., 1]
    left, right = redness[:, :48].max(), redness[:, 48:].max()
    assert left > right


def test_flips_and_colour_changes_are_not_offered():
    assert not {"hflip", "flip", "color", "hue", "solarize", "posterize", "invert"} & set(
        AUGMENT_OPS
    )
    with pytest.raises(ValueError, match=r"unknown augmentation ops.*hflip"):
        RandAugment(ops=("hflip",))
    assert train_augmentation("none") is None
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_augmentation("mixup")


def test_decoder_batch_drops_unreadable_images_and_augments_only_when_asked():
    from hericap.data.decode import decode_batch

    good = _jpeg(_photo(120, 80))
    batch = {
        "image_id": np.array(["a", "bad", "b"], dtype=object),
        "image": np.array([good, b"nope", good], dtype=object),
    }
    spec = ResizeSpec(mode="max_side", min_size=48, max_size=80)
    plain = decode_batch(batch, spec)
    assert list(plain["image_id"]) == ["a", "b"]
    assert plain["image"].shape == (2, 80, 80, 3)
    assert plain["image_hw"].tolist() == [[48, 72], [48, 72]]
    again = decode_batch(batch, spec)
    assert np.array_equal(plain["image"], again["image"])  # eval: deterministic
    augmented = [decode_batch(batch, spec, RandAugment(3, 9))["image"] for _ in range(4)]
    assert any(not np.array_equal(a, plain["image"]) for a in augmented)


@pytest.mark.ray
@pytest.mark.realdata
def test_real_photos_stream_through_ray_data_at_the_paper_rule(realdata, ray_cluster, tmp_path):
    """The 39 real Flickr8k photos (mixed aspect ratios) -> shards -> Ray Data with max-side
    resize and augmentation: every image arrives, each at the size the rule gives."""
    from hericap.data.prepare import prepare_records
    from hericap.data.readers import read_karpathy
    from hericap.data.shards import read_rows
    from hericap.runtime.datasets import shard_dataset

    f8k = realdata / "flickr8k"
    records = read_karpathy(f8k / "dataset_flickr8k.json", f8k / "images", "flickr8k")
    m = prepare_records(records, tmp_path / "f8k", "flickr8k", shard_rows=16, progress=False)
    files = [f for split in m.counts for f in m.files(split)]
    sizes = {r["image_id"]: (r["width"], r["height"]) for r in read_rows(files)}
    spec = ResizeSpec(mode="max_side", min_size=192, max_size=320)
    ds = shard_dataset(files, spec, augment=RandAugment(2, 5), columns=["image_id", "image"])
    seen = {}
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        assert batch["image"].shape[1:] == (320, 320, 3)
        for image_id, hw in zip(batch["image_id"], batch["image_hw"], strict=True):
            seen[str(image_id)] = tuple(int(v) for v in hw)
    assert len(seen) == 39 and set(seen) == set(sizes)
    for image_id, (w, h) in sizes.items():
        tw, th = spec.target_size(w, h)
        assert seen[image_id] == (th, tw)
    assert len({w / h > 1 for w, h in sizes.values()}) == 2  # landscape and portrait both seen
    photo = next((f8k / "images").glob("*.jpg"))
    assert load_image(Path(photo).read_bytes()).mode == "RGB"


def test_train_images_are_cached_only_unaugmented_and_within_the_limits():
    from hericap.training.driver import cache_decoded_train

    def cached(overrides: list[str], n_train: int, store: float | None = None) -> bool:
        decision, why = cache_decoded_train(
            load_config(["preset=demo", *overrides]), n_train, store
        )
        assert why  # the driver logs the reason either way
        return decision

    demo = load_config(["preset=demo"])
    assert demo.dataset.augment == "none" and demo.dataset.cache_decoded_mb == 2048
    assert cached([], 6000)  # 6000 x 64 x 64 x 3 bytes: 70 MiB
    assert not cached(["dataset.cache_decoded_mb=60"], 6000)
    assert not cached(["dataset.cache_decoded_mb=0"], 10)
    assert (
        "augment"
        in cache_decoded_train(load_config(["preset=demo", "dataset.augment=randaugment"]), 10)[1]
    )
    assert cached(["dataset.resize=max_side"], 1000)  # 640 x 640 canvases: 1.2 MB each
    assert not cached(["dataset.resize=max_side"], 2000)
    # half of Ray's object store is the other limit: 70 MiB needs a store over 140 MiB
    assert cached([], 6000, store=141 * 2**20)
    assert not cached([], 6000, store=139 * 2**20)


@pytest.mark.ray
def test_cached_train_images_are_the_streamed_pixels_and_need_no_shards_after(
    ray_cluster, tiny_shards, tmp_path
):
    """``cache=True`` decodes once: the shards can be gone and every execution still yields
    every image, with the pixels the streaming pipeline decodes, in a seeded order that
    repeats (exact resume)."""
    import shutil

    from hericap.runtime.datasets import shard_dataset

    files = []
    for src in tiny_shards.files("train"):
        files.append(tmp_path / Path(src).name)
        shutil.copy(src, files[-1])
    columns = ["image_id", "image"]
    streamed = {
        str(i): im
        for b in shard_dataset(files, 32, columns=columns).iter_batches(batch_format="numpy")
        for i, im in zip(b["image_id"], b["image"], strict=True)
    }
    cached = shard_dataset(files, 32, shuffle=True, seed=3, columns=columns, cache=True)
    for f in files:
        f.unlink()
    orders = []
    for _ in range(2):
        order = []
        for b in cached.iter_batches(batch_size=50, batch_format="numpy"):
            for image_id, image in zip(b["image_id"], b["image"], strict=True):
                assert np.array_equal(image, streamed[str(image_id)])
                order.append(str(image_id))
        orders.append(order)
    assert len(orders[0]) == len(streamed) == 256 and set(orders[0]) == set(streamed)
    assert orders[0] == orders[1]
    with pytest.raises(ValueError, match="freeze one draw of the augmentation"):
        shard_dataset(tiny_shards.files("train"), 32, augment=RandAugment(2, 5), cache=True)
