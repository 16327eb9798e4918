"""CLIPScore and RefCLIPScore as Hessel et al. (2021) define them, on a tiny random-init CLIP
(open_clip) and real Flickr8k photos with their human captions, against a direct computation;
weights from a local file, an OpenAI-style TorchScript file and S3; unavailable with a reason
without weights."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hericap.evaluation.clip_score import (
    CLIP_PROMPT,
    CLIP_W,
    check_clip_setup,
    clip_report,
    clip_status,
)

open_clip = pytest.importorskip("open_clip")

# A CLIP small enough for CPU tests; widths of 64 so that OpenAI's state-dict rule (heads =
# width / 64) rebuilds it from a TorchScript file; QuickGELU like OpenAI's models.
TINY_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1},
}
N_PHOTOS = 7


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(config path, weights file, TorchScript file, the model) of a seeded random-init CLIP."""
    root = tmp_path_factory.mktemp("clip")
    config = root / "tiny-clip-hericap.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-clip-hericap").eval()
    torch.save(model.state_dict(), root / "tiny.pt")
    traced = torch.jit.trace_module(
        model,
        {
            "encode_image": (torch.zeros(2, 3, 32, 32),),
            "encode_text": (torch.zeros(2, 77, dtype=torch.long),),
        },
    )
    torch.jit.save(traced, root / "tiny_openai_style.pt")
    return config, root / "tiny.pt", root / "tiny_openai_style.pt", model


@pytest.fixture(scope="module")
def photos(realdata):
    """(image id -> JPEG bytes, its first human caption, its other captions) of real photos."""
    sample = json.loads((realdata / "flickr8k/sample_captions.json").read_text())
    images, cands, refs = {}, {}, {}
    for im in sample["images"][:N_PHOTOS]:
        k = str(im["id"])
        images[k] = (realdata / "flickr8k/images" / im["file_name"]).read_bytes()
        captions = [a["caption"] for a in sample["annotations"] if a["image_id"] == im["id"]]
        cands[k], refs[k] = captions[0], captions[1:]
    # one image described with another's caption, so that scores differ between images
    first, second = sorted(cands)[:2]
    cands[first] = refs[second][0]
    return images, cands, refs


def _direct(model, images, cands, refs):
    """The paper's formulas written out: w * max(cos(c, v), 0), and the harmonic mean of that
    and max(max_r cos(c, r), 0); captions prefixed with the paper's prompt."""
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer("tiny-clip-hericap")

    def unit(x):
        x = x.detach().double().numpy()
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    out = {}
    with torch.no_grad():
        for k, data in images.items():
            v = unit(
                model.encode_image(preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])
            )
            c = unit(model.encode_text(tokenizer([f"{CLIP_PROMPT} {cands[k]}"])))
            r = unit(model.encode_text(tokenizer([f"{CLIP_PROMPT} {x}" for x in refs[k]])))
            clip_s = CLIP_W * max(float(v[0] @ c[0]), 0.0)
            ref_s = max(float(np.max(r @ c[0])), 0.0)
            ref_clip = 0.0 if clip_s + ref_s == 0 else 2 * clip_s * ref_s / (clip_s + ref_s)
            out[k] = {"CLIPScore": clip_s, "RefCLIPScore": ref_clip}
    return out


@pytest.mark.realdata
def test_clipscore_and_refclipscore_equal_the_papers_formulas(tiny_clip, photos):
    config, weights, scripted, model = tiny_clip
    images, cands, refs = photos
    expected = _direct(model, images, cands, refs)
    assert any(v["CLIPScore"] > 0 for v in expected.values())  # not all clipped to 0
    assert len({round(v["RefCLIPScore"], 6) for v in expected.values()}) > 1

    def stream():
        return iter(images.items())

    # batches of 3 over 7 images: the last batch is partial
    report = clip_report(
        str(weights), str(config), stream, cands, refs, batch_size=3, per_image=True
    )
    assert report["available"] and report["w"] == 2.5 and report["prompt"] == "A photo depicts"
    for k, values in expected.items():
        for key, value in values.items():
            assert report["per_image"][k][key] == pytest.approx(value, abs=1e-6), (k, key)
    for key in ("CLIPScore", "RefCLIPScore"):
        mean = np.mean([v[key] for v in expected.values()])
        assert report[key] == pytest.approx(mean, abs=1e-6)

    # OpenAI's own files are TorchScript archives: the architecture comes from the weights
    # (stored in float16 as OpenAI's are, hence the tolerance)
    openai_style = clip_report(
        str(scripted), "ViT-B-32-quickgelu", stream, cands, refs, batch_size=4
    )
    assert openai_style["CLIPScore"] == pytest.approx(report["CLIPScore"], abs=2e-3)
    assert openai_style["RefCLIPScore"] == pytest.approx(report["RefCLIPScore"], abs=2e-3)

    # without references: CLIPScore only
    alone = clip_report(str(weights), str(config), stream, cands, None, batch_size=8)
    assert alone["CLIPScore"] == pytest.approx(report["CLIPScore"], abs=1e-6)
    assert alone["RefCLIPScore"] is None


@pytest.mark.realdata
def test_clip_weights_from_s3_and_what_happens_without_them(
    tiny_clip, photos, moto_server, tmp_path
):
    import boto3

    config, weights, _, _ = tiny_clip
    images, cands, refs = photos
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="clip")
    boto3.client("s3", endpoint_url=moto_server).upload_file(str(weights), "clip", "w/tiny.pt")
    local = clip_report(str(weights), str(config), lambda: iter(images.items()), cands, refs)
    remote = clip_report(
        "s3://clip/w/tiny.pt", str(config), lambda: iter(images.items()), cands, refs
    )
    assert remote["available"] and remote["CLIPScore"] == local["CLIPScore"]

    # no weights: unavailable with the reason, like SPICE; nothing is downloaded
    none = clip_report(None, "ViT-B-32-quickgelu", lambda: iter(()), cands, refs)
    assert not none["available"] and none["CLIPScore"] is None
    assert (
        "evaluation.clip_checkpoint" in none["status"] and "nothing is downloaded" in none["status"]
    )
    check_clip_setup(None)  # nothing asked for: nothing to fail
    # weights asked for but absent: an error before any decoding
    with pytest.raises(FileNotFoundError, match="is not a file"):
        check_clip_setup(str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError):
        check_clip_setup("s3://clip/w/missing.pt")
    assert not clip_status("openai").available  # a hub tag is not a file: never fetched
    with pytest.raises(ValueError, match="not an open_clip model"):
        check_clip_setup(str(weights), "ViT-B/32")  # the paper's spelling, not open_clip's
    check_clip_setup(str(weights), str(config))
    # weights of another architecture: reported unavailable with the load error, not a crash
    wrong = clip_report(str(weights), "ViT-B-32-quickgelu", lambda: iter(images.items()), cands)
    assert not wrong["available"] and wrong["status"].startswith("CLIP failed")
