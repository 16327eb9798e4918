"""The endpoint's web page (``GET /``) in a real headless browser, and ``POST /explain`` that
draws its heatmaps.

Debian's ``chromium`` and ``chromedriver`` are found on the PATH and driven by selenium; nothing
is downloaded at run time (``.ci/run`` installs them with apt-get). Without them the browser
tests skip and say why; the API and page-content tests still run. One Serve deployment serves
the whole module. ``HERICAP_SCREENSHOT_DIR=docs/images`` keeps the page's screenshot
(``web_page.png``) where the docs show it; by default it goes to pytest's temporary folder.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from helpers import free_port, jpeg
from PIL import Image
from tiny_model import TINY_MODEL

from hericap.checkpoint import save_checkpoint
from hericap.config import load_config
from hericap.data.text import Vocabulary
from hericap.models.builder import build_captioner

MAX_BYTES = 2_000_000
WAIT_S = 60


def _checkpoint(out: Path, vocab: Vocabulary, *overrides: str) -> Path:
    """A checkpoint folder of an untrained model: the page does not need a trained one."""
    cfg = load_config(["preset=demo", *TINY_MODEL, *overrides])
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    return save_checkpoint(out, model, cfg, vocab, meta={"epoch": 0, "val_CIDEr": 0.0})


@pytest.fixture(scope="module")
def vocab(tiny_shards) -> Vocabulary:
    return Vocabulary.load(tiny_shards.vocab_path)


@pytest.fixture(scope="module")
def endpoint(ray_cluster, vocab, tmp_path_factory):
    """The application on a free port of 127.0.0.1; shut down after the module."""
    from hericap.serve.server import start, stop

    ckpt = _checkpoint(tmp_path_factory.mktemp("web") / "ckpt", vocab)
    args = {
        "checkpoint": str(ckpt),
        "beam_size": 3,
        "n_best": 2,
        "max_len": 8,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.02,
        "max_bytes": MAX_BYTES,
        "num_cpus": 0.5,
    }
    url = start(args, port=free_port())
    assert requests.get(f"{url}/healthz", timeout=60).status_code == 200
    yield url
    stop()


def _browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver) from the PATH, or a skip that says what to install."""
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "no headless browser: chromium and chromedriver are not on the PATH "
            "(`apt-get install chromium chromium-driver`, which .ci/run does where apt works)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian chromium through its own chromedriver (selenium downloads nothing when
    given the driver's path). Tests ask for it before the endpoint: no browser, no Serve."""
    binary, driver_path = _browser_binaries()
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (it is in the [dev] extra)"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # offline machine: no update, sync or field-trial connections at start-up
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _api_refusal(url: str, path: str, body: bytes, media: str | None) -> tuple[int, str]:
    """(status, reason) of the API for this upload."""
    headers = {"Content-Type": media} if media else {}
    r = requests.post(f"{url}/{path}", data=body, headers=headers, timeout=60)
    return r.status_code, r.json()["error"]


# ---------------------------------------------------------------------------- no Ray needed


def test_page_is_self_contained_package_data():
    from hericap.serve.app import page_html

    html = page_html()
    assert "<title>HeriCap captioning</title>" in html
    # nothing from elsewhere: no URLs with a scheme or a host, no linked files at all
    assert not re.search(r"(https?:|ftp:|//[\w.-]+\.\w)", html), "external URL in the page"
    assert not re.search(r"<(link|iframe|object|embed)\b", html, re.I)
    assert not re.search(r"<script[^>]*\bsrc=", html, re.I)
    assert not re.search(r"@import|@font-face|\burl\(", html)
    for call in re.findall(r"""(?:call|fetch)\(\s*[`"']([^`"'?$]+)""", html):
        assert call in {"caption", "explain", "healthz"}, call


# aspect kept (max_side: 600x400 -> 60x40, padded to the model's stride: the maps cover padding)
# or squashed (square)
KEEP_ASPECT = ("dataset.resize=max_side", "dataset.min_size=40", "dataset.max_size=96")


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        (("preset=tiny", "model.grid_layer_type=routing", *KEEP_ASPECT), "maps"),
        (("preset=tiny", "model.use_gri_feat=false", "model.use_glob_feat=false"), "regions"),
    ],
)
def test_service_explains_each_word_of_a_caption(vocab, tmp_path, overrides, kind):
    from skimage import data

    from hericap.serve.service import CaptionService

    service = CaptionService(str(_checkpoint(tmp_path / "ckpt", vocab, *overrides)), max_len=8)
    words = vocab.itos[4:7]
    image = Image.fromarray(data.coffee())  # 600x400
    out = service.explain(image, " ".join(words))
    assert out["words"] == [*words, "<eos>"] and out["explain_ms"] > 0
    if kind == "maps":
        m = service.loaded.model.input_multiple  # the crop is rounded up to the model's stride
        assert out["image_extent"] == [40 / (-(-40 // m) * m), 60 / (-(-60 // m) * m)]
        assert out["image_extent"][0] < 1
        maps = np.asarray(out["maps"])
        assert maps.shape == (4, *out["map_size"]) and out["regions"] is None
        assert np.allclose(maps.max(axis=(1, 2)), 1) and maps.min() >= 0
        assert out["routing"] and {"name", "weight"} <= set(out["routing"][0])
    else:
        assert out["image_extent"] == [1, 1]  # squashed to the square
        assert out["maps"] is None and not out["routing"]
        boxes, weights = out["regions"]["boxes"], np.asarray(out["regions"]["weights"])
        assert len(boxes[0]) == 4 and weights.shape == (4, len(boxes))
    # words outside the vocabulary are explained as <unk>; too many words are refused
    assert service.explain(image, "zzzunknownword")["words"] == ["<unk>", "<eos>"]
    with pytest.raises(ValueError, match="at most max_len=8"):
        service.explain(image, " ".join([words[0]] * 9))


# ---------------------------------------------------------------------- the endpoint's API


@pytest.mark.ray
def test_explain_endpoint_explains_and_refuses_like_caption(endpoint, vocab):
    from skimage import data

    page = requests.get(f"{endpoint}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "HeriCap captioning" in page.text
    limits = requests.get(f"{endpoint}/healthz", timeout=30).json()["limits"]
    assert limits["max_bytes"] == MAX_BYTES and "image/jpeg" in limits["content_types"]

    photo = jpeg(data.astronaut())
    caption = requests.post(
        f"{endpoint}/caption", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60
    ).json()
    r = requests.post(
        f"{endpoint}/explain", data=photo, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["caption"] == caption["caption"] and out["model"] == caption["model"]
    assert out["words"][-1] == "<eos>" and len(out["maps"]) == len(out["words"])
    assert out["timing"]["explain_ms"] > 0 and "decode_ms" in out["timing"]

    chosen = " ".join(vocab.itos[4:6])
    r = requests.post(
        f"{endpoint}/explain",
        params={"caption": chosen},
        files={"image": ("astronaut.jpg", photo, "image/jpeg")},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["words"] == [*vocab.itos[4:6], "<eos>"]
    assert "decode_ms" not in r.json()["timing"]  # a given caption is not decoded

    cases = {
        "non-image bytes": (b"this is not an image at all", "image/jpeg"),
        "wrong content type": (photo, "text/plain"),
        "no content type": (photo, None),
        "empty body": (b"", "image/png"),
        "over the size limit": (b"\xff" * (MAX_BYTES + 1), "image/jpeg"),
    }
    for name, (body, media) in cases.items():
        assert _api_refusal(endpoint, "explain", body, media) == _api_refusal(
            endpoint, "caption", body, media
        ), name
    long = requests.post(
        f"{endpoint}/explain",
        params={"caption": " ".join(["word"] * 9)},
        data=photo,
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert long.status_code == 400 and "max_len=8" in long.json()["error"]


# ---------------------------------------------------------------------------- the browser


def _wait(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S).until(condition)
    except TimeoutException as e:
        raise AssertionError(f"the page never showed {what}; it shows: {_shown(driver)}") from e


def _shown(driver) -> str:
    return driver.find_element("tag name", "body").text[:1000]


def _visible_text(driver, element_id: str) -> str:
    element = driver.find_element("id", element_id)
    return element.text if element.is_displayed() else ""


def _upload(driver, path: Path) -> None:
    driver.find_element("id", "file").send_keys(str(path))


def _full_page_png(driver) -> bytes:
    """The whole page, not only the window's viewport (Chrome DevTools' own screenshot)."""
    width, height = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight];"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    return base64.b64decode(shot["data"])


def _screenshot_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("HERICAP_SCREENSHOT_DIR")
    out = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.mark.ray
def test_page_captions_a_real_photo_and_draws_its_heatmaps(
    browser, endpoint, tmp_path, tmp_path_factory
):
    from skimage import data

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(jpeg(data.astronaut()))
    expected = requests.post(
        f"{endpoint}/caption",
        data=photo.read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    ).json()

    browser.get(f"{endpoint}/")
    _wait(browser, lambda d: _visible_text(d, "model") == expected["model"], "the model id")
    assert "jpeg" in _visible_text(browser, "limits")
    _upload(browser, photo)
    _wait(browser, lambda d: _visible_text(d, "caption"), "a caption")
    assert _visible_text(browser, "caption") == expected["caption"] or expected["caption"] == ""
    beams = browser.find_elements("css selector", "#beams tr")
    assert [b.find_element("css selector", ".beam-caption").text for b in beams] == [
        beam["caption"] or "(empty)" for beam in expected["beams"]
    ]
    log_probs = [float(b.find_element("css selector", ".log-prob").text) for b in beams]
    assert log_probs == sorted(log_probs, reverse=True) and all(lp <= 0 for lp in log_probs)
    timing = _visible_text(browser, "timing")
    assert expected["model"] in timing and "decode" in timing and "512×512" in timing

    beams[0].find_element("css selector", "button.explain-beam").click()
    figures = _wait(
        browser,
        lambda d: d.find_elements("css selector", "#heatmaps figure"),
        "the heatmaps",
    )
    words = [f.find_element("tag name", "figcaption").text for f in figures]
    assert words == [*expected["caption"].split(), "<eos>"]
    # each panel is the photo with a heatmap drawn over it: not blank
    spread = browser.execute_script(
        "const c = document.querySelector('#heatmaps canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4) {"
        "  lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); } return hi - lo;"
    )
    assert spread > 50
    assert "explain" in _visible_text(browser, "explain-status")

    shot = _screenshot_dir(tmp_path_factory) / "web_page.png"
    shot.write_bytes(_full_page_png(browser))
    with Image.open(shot) as png:
        assert png.size[0] >= 1000 and png.size[1] > 1000


@pytest.mark.ray
def test_page_shows_the_api_reason_for_refused_uploads(browser, endpoint, tmp_path):
    browser.get(f"{endpoint}/")
    text = b"these are notes, not a photo\n"
    cases = {
        # the browser sends text/plain, then image/jpeg for a file that only claims to be one
        "notes.txt": (text, "text/plain"),
        "fake.jpg": (text, "image/jpeg"),
        "huge.jpg": (b"\xff" * (MAX_BYTES + 1), "image/jpeg"),
    }
    for name, (body, media) in cases.items():
        path = tmp_path / name
        path.write_bytes(body)
        status, reason = _api_refusal(endpoint, "caption", body, media)
        _upload(browser, path)
        shown = _wait(browser, lambda d, n=name: n in _visible_text(d, "error"), f"{name}'s error")
        assert shown
        error = _visible_text(browser, "error")
        assert f"HTTP {status}" in error and reason in error, (name, error)
        assert not browser.find_element("id", "result").is_displayed()

    # a file dropped on the drop zone goes the same way
    browser.execute_script(
        "const t = new DataTransfer();"
        "t.items.add(new File(['not an image'], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: t, bubbles: true, cancelable: true}));"
    )
    _wait(browser, lambda d: "dropped.png" in _visible_text(d, "error"), "the dropped file's error")
    assert "not an image" in _visible_text(browser, "error")
