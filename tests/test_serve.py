"""The Ray Serve captioning endpoint over real HTTP on 127.0.0.1, with real photos
(``skimage.data``), every hostile input of issue 7, and 200 requests at concurrency 16; plus
``hericap caption --explain`` and the ``serve deploy`` config."""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from helpers import free_port, jpeg
from PIL import Image
from tiny_model import TINY_MODEL

from hericap.checkpoint import save_checkpoint
from hericap.config import load_config
from hericap.data.text import Vocabulary
from hericap.models.builder import build_captioner

TINY = [
    "preset=demo",
    *TINY_MODEL,
]
MAX_BYTES = 2_000_000


def _checkpoint(out: Path, vocab: Vocabulary, *overrides: str) -> Path:
    """A checkpoint folder of an untrained model: serving does not need a trained one."""
    cfg = load_config([*TINY, *overrides])
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    return save_checkpoint(out, model, cfg, vocab, meta={"epoch": 0, "val_CIDEr": 0.0})


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _photos() -> dict[str, tuple[bytes, str]]:
    """Real photos from scikit-image, in the forms an endpoint meets: name -> (bytes, type)."""
    from skimage import data

    astronaut, coffee = data.astronaut(), data.coffee()
    cmyk = io.BytesIO()
    Image.fromarray(data.chelsea()).convert("CMYK").save(cmyk, format="JPEG")
    rgba = Image.fromarray(data.rocket()).convert("RGBA")
    rgba.putalpha(128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return {
        "astronaut.jpg": (jpeg(astronaut), "image/jpeg"),
        "coffee.png": (_png(Image.fromarray(coffee)), "image/png"),
        "camera_gray.jpg": (jpeg(data.camera()), "image/jpeg"),
        "chelsea_cmyk.jpg": (cmyk.getvalue(), "image/jpeg"),
        "rocket_alpha.png": (_png(rgba), "image/png"),
        "coffee_exif6.jpg": (jpeg(coffee, exif=exif), "image/jpeg"),
    }


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``, with no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def vocab(tiny_shards) -> Vocabulary:
    return Vocabulary.load(tiny_shards.vocab_path)


@pytest.fixture(scope="module")
def endpoint(ray_cluster, vocab, tmp_path_factory):
    """The application on a free port of 127.0.0.1; shut down after the module."""
    from hericap.serve.server import start, stop

    ckpt = _checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", vocab)
    port = free_port()
    url = start(
        {
            "checkpoint": str(ckpt),
            "beam_size": 3,
            "n_best": 2,
            "max_len": 8,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.02,
            "max_bytes": MAX_BYTES,
            "num_cpus": 0.5,
        },
        port=port,
    )
    assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
    yield url
    stop()


def _healthy(url: str) -> None:
    r = requests.get(f"{url}/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.ray
def test_real_photos_are_captioned_raw_and_multipart(endpoint):
    health = requests.get(f"{endpoint}/healthz", timeout=30).json()
    assert health["max_batch_size"] == 8 and health["model"] == "serve0/epoch1"
    paths = requests.get(f"{endpoint}/openapi.json", timeout=30).json()["paths"]
    assert {"/caption", "/healthz"} <= set(paths)

    for name, (body, media) in _photos().items():
        r = requests.post(
            f"{endpoint}/caption", data=body, headers={"Content-Type": media}, timeout=60
        )
        assert r.status_code == 200, (name, r.text)
        out = r.json()
        assert isinstance(out["caption"], str) and out["model"] == "serve0/epoch1"
        assert len(out["beams"]) == 2 and out["beams"][0]["caption"] == out["caption"]
        assert out["beams"][0]["log_prob"] >= out["beams"][1]["log_prob"]
        assert out["timing"]["total_ms"] > 0 and out["timing"]["batch_size"] >= 1
        if name == "coffee_exif6.jpg":  # 600x400 stored, shown upright as 400x600
            assert (out["image"]["width"], out["image"]["height"]) == (400, 600)

    body, media = _photos()["astronaut.jpg"]
    r = requests.post(
        f"{endpoint}/caption", files={"image": ("astronaut.jpg", body, media)}, timeout=60
    )
    assert r.status_code == 200 and r.json()["image"] == {"width": 512, "height": 512}


@pytest.mark.ray
def test_hostile_input_gets_a_4xx_with_a_reason_and_the_endpoint_stays_up(endpoint):
    from skimage import data

    photo = jpeg(data.astronaut())
    bomb = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(bomb, format="PNG")  # 1e8 pixels in a few KB
    assert len(bomb.getvalue()) < 100_000
    cases = {
        "non-image bytes": (b"this is not an image at all", "image/jpeg", 400),
        "truncated JPEG": (photo[: len(photo) // 2], "image/jpeg", 400),
        "empty body": (b"", "image/png", 400),
        "wrong content type": (photo, "text/plain", 415),
        "no content type": (photo, "", 415),
        "over the size limit": (b"\xff" * (MAX_BYTES + 1), "image/jpeg", 413),
        "decompression bomb": (bomb.getvalue(), "image/png", 413),
        "absurd dimensions": (_png_header_only(100_000, 1), "image/png", 413),
        "zero-size header": (_png_header_only(0, 0), "image/png", 400),
        "multipart without the image field": (None, None, 400),
        "malformed multipart": (b"--x\r\nnot a part", "multipart/form-data; boundary=x", 400),
    }
    for name, (body, media, status) in cases.items():
        if body is None:
            r = requests.post(f"{endpoint}/caption", files={"photo": ("a.jpg", photo)}, timeout=30)
        else:
            headers = {"Content-Type": media} if media else {}
            r = requests.post(f"{endpoint}/caption", data=body, headers=headers, timeout=30)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json"), name
        assert r.json()["error"], name
        _healthy(endpoint)
    # still captioning after all that
    r = requests.post(
        f"{endpoint}/caption", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert r.status_code == 200


@pytest.mark.ray
def test_two_hundred_requests_at_concurrency_sixteen_without_errors(endpoint):
    from skimage import data

    bodies = [jpeg(data.astronaut()), jpeg(data.coffee()), jpeg(data.chelsea())]

    def post(i: int) -> tuple[int, int]:
        r = requests.post(
            f"{endpoint}/caption",
            data=bodies[i % 3],
            headers={"Content-Type": "image/jpeg"},
            timeout=120,
        )
        return r.status_code, r.json().get("timing", {}).get("batch_size", 0)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, range(200)))
    assert [s for s, _ in results].count(200) == 200
    assert max(b for _, b in results) > 1  # requests were batched
    _healthy(endpoint)


def test_caption_cli_prints_captions_and_draws_attention_with_routing(vocab, tmp_path):
    from skimage import data

    from hericap.cli import main
    from hericap.evaluation.explain import word_maps

    ckpt = _checkpoint(
        tmp_path / "ckpt",
        vocab,
        "preset=tiny",
        "model.grid_layer_type=routing",
        "model.cap_generator.decoder_name=Concatenated_Parallel",
    )
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(jpeg(data.astronaut()))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "explain.png"
    assert main(["caption", str(photo), "--checkpoint", str(ckpt), "--explain", str(out)]) == 0
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > 400
    # a bad file is reported and makes the exit status non-zero, the good one still captioned
    assert main(["caption", str(photo), str(broken), "--checkpoint", str(ckpt)]) == 1

    from hericap.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    tokens = torch.tensor([[vocab.bos_idx, 5, 6, 7]])
    att = loaded.model.attention(torch.randn(1, 3, 64, 64), tokens)
    maps, regions = word_maps(att)
    h, w = att.encoded.map_size
    assert maps.shape == (4, h, w) and np.allclose(maps.sum((1, 2)) > 0, True)
    assert regions.shape[0] == 4 and att.encoded.routing


def test_serve_deploy_config_names_a_builder_that_builds(vocab, tmp_path):
    from ray.serve import Application

    from hericap.cli import main
    from hericap.serve import app as serve_app

    ckpt = _checkpoint(tmp_path / "ckpt", vocab)
    out = tmp_path / "serve.yaml"
    assert main(["serve", "--checkpoint", str(ckpt), "--write-config", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    (application,) = config["applications"]
    module, attr = application["import_path"].split(":")
    assert module == "hericap.serve.app" and attr == "build_app"
    assert set(application["args"]) <= set(serve_app.DEFAULTS)
    assert isinstance(serve_app.build_app(application["args"]), Application)
    with pytest.raises(ValueError, match="unknown serve arguments"):
        serve_app.build_app({"checkpoint": str(ckpt), "max_batchsize": 4})
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert json.loads(json.dumps(application["args"]))["max_batch_size"] == 16
