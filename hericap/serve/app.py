"""The Ray Serve captioning application: a FastAPI ingress over :class:`CaptionService`.

* ``POST /caption``: the image as the raw body (an image content type) or as multipart field
  ``image``; returns the caption, the top-n beams with their log-probabilities, the model id
  and timings. Bad input gets a 4xx JSON ``{"error": reason}``; nothing is fetched from URLs.
* ``POST /explain``: the same upload (the same refusals), and optionally ``?caption=`` (else the
  model's own, decoded through the batch); returns per-word attention maps as JSON (the
  ``hericap caption --explain`` view, drawn by the page). It runs outside the batch, one at a
  time per replica, off the event loop.
* ``GET /``: the web page (``static/index.html``, self-contained: no external scripts, styles or
  fonts): pick or drop an image, see the caption, the beams, the heatmaps, the model and timings.
* ``GET /healthz``: the model id, the device it runs on, the batching settings, the decoding
  settings (beam size, every ``decode.*`` control: the checkpoint's unless the application's
  arguments set them) and the upload limits.
* ``/docs``: OpenAPI (FastAPI's).

Requests are batched by ``@serve.batch``; ``max_ongoing_requests`` is set above the batch size
so batches can fill (Ray Serve's default of 5 would cap them). The default wait is 100 ms, not
Serve's 10 ms. Under load the batch fills first and the wait never runs out; it matters when
requests come back slower than a short wait: each one costs the event loop several ms of Python
(Ray's request plumbing, FastAPI, the image checks), and on CPU the model's Python holds the GIL
while a batch decodes. Measured at concurrency 16 on 2 cores, a 10 ms wait fired with ~3
requests, 50 ms with ~7-8, 100 ms with ~14-16 (3.6-4.6x the unbatched throughput, median
4.1x). A lone request pays up to the wait in latency: lower it (``batch_wait_timeout_s``) where
load is light.

``serve run hericap.serve.app:build_app checkpoint=PATH`` and ``serve deploy`` configs
(:func:`serve_config`) use :func:`build_app`.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoint signatures of a
# Serve ingress class at run time, and string annotations (Request) break that.
import asyncio
import functools
import importlib.resources
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from ray import serve
from ray.serve import Application

from hericap.checkpoint.folder import read_config_and_vocab
from hericap.config.flavours import resolve_options
from hericap.models.decoding import check_search_controls
from hericap.serve.images import (
    IMAGE_CONTENT_TYPES,
    ImageLimits,
    UploadRejectedError,
    check_content_type,
    open_upload,
)
from hericap.serve.service import CaptionService, service_controls

__all__ = ["DECODE_ARGS", "DEFAULTS", "build_app", "serve_config"]

logger = logging.getLogger(__name__)

# build_app's arguments and their defaults (also the keys of a Serve config's `args`)
DEFAULTS: dict[str, Any] = {
    "checkpoint": None,
    "beam_size": 5,
    "n_best": 3,
    "max_len": 20,
    "max_batch_size": 16,
    "batch_wait_timeout_s": 0.1,
    "num_replicas": 1,
    "autoscaling": None,  # e.g. {"min_replicas": 1, "max_replicas": 4}; replaces num_replicas
    "num_cpus": 1.0,
    "num_gpus": 0.0,  # > 0: each replica gets (a share of) a GPU and decodes there
    "torch_threads": 1,
    "max_bytes": ImageLimits.max_bytes,
    "max_pixels": ImageLimits.max_pixels,
    "max_side": ImageLimits.max_side,
    # decoding controls (docs/decoding.md); None: the checkpoint's decode.* value
    "alpha": None,
    "length_penalty": None,
    "no_repeat_ngram_size": None,
    "min_len": None,
    "beam_groups": None,
    "diversity_strength": None,
    "collapse_repeats": None,
}
# build_app's arguments that are decoding controls, and the type each one's value takes
# (`serve run ... alpha=0.9` passes strings)
DECODE_ARGS: dict[str, type] = {
    "alpha": float,
    "length_penalty": float,
    "no_repeat_ngram_size": int,
    "min_len": int,
    "beam_groups": int,
    "diversity_strength": float,
}

api = FastAPI(
    title="HeriCap captioning",
    description="POST an image, get captions (hierarchical encoder-decoder, beam search).",
)


# longest ?caption= that /explain reads (max_len words never need more)
MAX_CAPTION_CHARS = 1000


@functools.cache
def page_html() -> str:
    """The web page served at ``GET /`` (package data ``hericap/serve/static/index.html``)."""
    return (importlib.resources.files("hericap.serve") / "static" / "index.html").read_text()


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason, "status": status}, status_code=status)


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) as soon as it passes ``max_bytes``, before reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise UploadRejectedError(413, f"{declared} bytes is over the limit of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise UploadRejectedError(413, f"body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment
@serve.ingress(api)
class CaptionDeployment:
    def __init__(
        self,
        checkpoint: str,
        beam_size: int,
        n_best: int,
        max_len: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        torch_threads: int,
        limits: ImageLimits,
        decode: dict[str, Any] | None = None,
        collapse_repeats: bool | None = None,
    ) -> None:
        self.service = CaptionService(
            checkpoint, beam_size=beam_size, n_best=n_best, max_len=max_len,
            torch_threads=torch_threads, decode=decode or {}, collapse_repeats=collapse_repeats,
        )  # fmt: skip
        self.limits = limits
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        # explanations skip the batch; one at a time keeps them from crowding batches off the CPU
        self._explaining = asyncio.Semaphore(1)
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        logger.info("serving %s (batches of up to %d)", self.service.id, max_batch_size)

    # placeholders: __init__ sets the application's own size and wait
    @serve.batch(
        max_batch_size=DEFAULTS["max_batch_size"],
        batch_wait_timeout_s=DEFAULTS["batch_wait_timeout_s"],
    )
    async def _batched(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        # the model runs off the event loop, so requests keep arriving while a batch decodes
        return await asyncio.get_running_loop().run_in_executor(None, self.service.caption, images)

    async def _image_from(self, request: Request) -> Image.Image:
        media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if media == "multipart/form-data":
            declared = request.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.limits.max_bytes + 65536:
                raise UploadRejectedError(413, f"{declared} bytes is over the limit")
            try:
                form = await request.form()
            except Exception as e:  # malformed multipart
                raise UploadRejectedError(400, f"unreadable multipart body: {e}") from e
            field = form.get("image")
            if field is None or isinstance(field, str):
                raise UploadRejectedError(
                    400, f"multipart body has no file field 'image' (fields: {list(form.keys())})"
                )
            check_content_type(field.content_type or "image/jpeg")
            data = await field.read(self.limits.max_bytes + 1)
        else:
            check_content_type(media)
            data = await _read_body(request, self.limits.max_bytes)
        return open_upload(data, self.limits)

    @api.post("/caption")
    async def caption(self, request: Request) -> JSONResponse:
        """Caption one image: raw body with an image content type, or multipart ``image``."""
        t0 = time.perf_counter()
        try:
            image = await self._image_from(request)
        except UploadRejectedError as e:
            return _error(e.status, e.reason)
        result = await self._batched(image)
        return JSONResponse(
            {
                "caption": result["caption"],
                "beams": result["beams"],
                "model": self.service.id,
                "image": {"width": image.width, "height": image.height},
                "timing": {
                    "total_ms": 1000 * (time.perf_counter() - t0),
                    "decode_ms": result["decode_ms"],
                    "batch_size": result["batch_size"],
                },
            }
        )

    @api.post("/explain")
    async def explain(self, request: Request, caption: str | None = None) -> JSONResponse:
        """Per-word attention of ``caption`` (default: the model's own) over the uploaded image,
        sent like ``POST /caption``: ``words``, ``maps [T][h][w]`` or ``regions``, ``routing``,
        ``image_extent`` (the part of the maps the image covers), model and timings."""
        t0 = time.perf_counter()
        if caption is not None and len(caption) > MAX_CAPTION_CHARS:
            return _error(400, f"caption is {len(caption)} characters; at most {MAX_CAPTION_CHARS}")
        try:
            image = await self._image_from(request)
            if caption and caption.strip():
                self.service.caption_tokens(caption)  # too long: refused before any work
        except UploadRejectedError as e:
            return _error(e.status, e.reason)
        except ValueError as e:
            return _error(400, str(e))
        timing: dict[str, float] = {}
        if not (caption and caption.strip()):
            decoded = await self._batched(image)
            caption, timing["decode_ms"] = decoded["caption"], decoded["decode_ms"]
        async with self._explaining:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self.service.explain, image, caption)
        timing["explain_ms"] = result.pop("explain_ms")
        timing["total_ms"] = 1000 * (time.perf_counter() - t0)
        return JSONResponse(
            {
                **result,
                "model": self.service.id,
                "image": {"width": image.width, "height": image.height},
                "timing": timing,
            }
        )

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: upload, caption, beams, heatmaps (all requests go to this endpoint)."""
        return HTMLResponse(page_html())

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.service.id,
            "device": str(self.service.torch_device),
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "decode": self.service.settings(),
            "limits": {
                "max_bytes": self.limits.max_bytes,
                "max_pixels": self.limits.max_pixels,
                "max_side": self.limits.max_side,
                "content_types": sorted(IMAGE_CONTENT_TYPES),
            },
        }


def _flag(value: Any) -> bool | None:
    """A boolean argument, also as the string `serve run key=value` passes."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"collapse_repeats={value!r}: use true or false")
    return text in ("true", "1", "yes")


def _decode_args(a: dict[str, Any]) -> dict[str, Any]:
    """The decoding controls among the arguments, typed (left out or None: the checkpoint's)."""
    try:
        return {k: kind(a[k]) for k, kind in DECODE_ARGS.items() if a[k] is not None}
    except ValueError as e:
        raise ValueError(f"bad decoding argument: {e} (see docs/decoding.md)") from e


def _check_decoding(checkpoint: str, decode: dict[str, Any], beam_size: int, max_len: int) -> None:
    """Bad decoding arguments fail here, not in every replica: they are checked with the
    checkpoint's own ``decode.*`` when its folder is readable from this process."""
    try:
        config, _ = read_config_and_vocab(checkpoint)
    except FileNotFoundError:
        logger.info("%s is not readable here: its replicas check the decoding", checkpoint)
        return
    controls = service_controls(config.decode, decode)
    controls.validate(beam_size, max_len)
    check_search_controls(resolve_options(config.model).beam_search, controls)


def build_app(args: dict[str, Any]) -> Application:
    """The application for ``args`` (keys of :data:`DEFAULTS`; ``checkpoint`` required)."""
    unknown = set(args) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown serve arguments {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    a = {**DEFAULTS, **args}
    if not a["checkpoint"]:
        raise ValueError("serve needs checkpoint=PATH (a HeriCap checkpoint folder)")
    max_batch = int(a["max_batch_size"])
    decode = _decode_args(a)
    _check_decoding(str(a["checkpoint"]), decode, int(a["beam_size"]), int(a["max_len"]))
    options: dict[str, Any] = {
        # room for a full batch waiting while another decodes
        "max_ongoing_requests": max(2 * max_batch, 8),
        "ray_actor_options": {"num_cpus": float(a["num_cpus"]), "num_gpus": float(a["num_gpus"])},
    }
    if a["autoscaling"]:
        options["autoscaling_config"] = {
            "target_ongoing_requests": max_batch,
            **a["autoscaling"],
        }
    else:
        options["num_replicas"] = int(a["num_replicas"])
    return CaptionDeployment.options(**options).bind(
        checkpoint=str(a["checkpoint"]),
        beam_size=int(a["beam_size"]),
        n_best=int(a["n_best"]),
        max_len=int(a["max_len"]),
        max_batch_size=max_batch,
        batch_wait_timeout_s=float(a["batch_wait_timeout_s"]),
        torch_threads=int(a["torch_threads"]),
        limits=ImageLimits(int(a["max_bytes"]), int(a["max_pixels"]), int(a["max_side"])),
        decode=decode,
        collapse_repeats=_flag(a["collapse_repeats"]),
    )


def serve_config(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000) -> dict:
    """A Serve config (``serve deploy FILE``) running :func:`build_app` with ``args``."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": "hericap",
                "route_prefix": "/",
                "import_path": "hericap.serve.app:build_app",
                "args": {k: v for k, v in {**DEFAULTS, **args}.items() if v is not None},
            }
        ],
    }
