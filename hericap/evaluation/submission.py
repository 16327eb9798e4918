"""The files an evaluation writes for others: the COCO test-server results file, the nocaps EvalAI
submission, and the per-image scores with the worst images (no Ray).

* COCO (``captions_<subset>2014_<name>_results.json``): ``[{"image_id": int, "caption": str}]``,
  one caption per image, in the layout the COCO caption evaluation server takes (zip the test2014
  and val2014 files together to submit).
* nocaps (``nocaps_<split>_<name>_evalai.json``): the same list, with nocaps' own image ids, for
  the nocaps challenge on EvalAI (val: 4,500 images, test: 10,600).
* ``<split>_per_image.json``: every image with its caption, references, domain (nocaps) and every
  metric the toolkit (and CLIPScore) computes per image, and the N worst images by CIDEr.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "COCO_SERVER_IMAGES",
    "NOCAPS_IMAGES",
    "coco_subset",
    "per_image_rows",
    "submission_name",
    "worst_images",
    "write_coco_server_results",
    "write_nocaps_submission",
    "write_per_image",
]

logger = logging.getLogger(__name__)

# Images the COCO caption server scores per subset (all of them must be in the file).
COCO_SERVER_IMAGES = {"test2014": 40_775, "val2014": 40_504}
# Images of each nocaps split the EvalAI challenge scores.
NOCAPS_IMAGES = {"val": 4_500, "test": 10_600}
# COCO 2014 file names: COCO_val2014_000000391895.jpg (Karpathy files prefix a folder).
_COCO_FILE = re.compile(r"(?:^|/)COCO_(train|val|test)2014_\d+\.\w+$")
# The metric the worst images are ranked by.
WORST_BY = "CIDEr"


def submission_name(configured: str | None, exp_name: str) -> str:
    """``evaluation.submission_name``, else ``exp.name`` with every character the servers'
    file names cannot hold (anything but letters, digits and hyphens) replaced by ``-``."""
    if configured:
        return configured
    return re.sub(r"[^A-Za-z0-9-]", "-", exp_name).strip("-") or "hericap"


def coco_subset(file_names: Iterable[str | None]) -> str | None:
    """``"test2014"`` / ``"val2014"`` / ``"train2014"`` when every image is a COCO 2014 image of
    that subset (by its file name), else None (not COCO, or mixed)."""
    subsets = set()
    for name in file_names:
        match = _COCO_FILE.search(name or "")
        if match is None:
            return None
        subsets.add(f"{match.group(1)}2014")
    return subsets.pop() if len(subsets) == 1 else None


def _int_ids(candidates: Mapping[str, str], what: str) -> list[dict[str, Any]]:
    rows = []
    for image_id, caption in candidates.items():
        try:
            number = int(image_id)
        except ValueError as e:
            raise ValueError(
                f"{what} needs integer image ids; image {image_id!r} is not one (were the shards "
                "prepared from the official annotation files?)"
            ) from e
        rows.append({"image_id": number, "caption": caption})
    return sorted(rows, key=lambda r: r["image_id"])


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def write_coco_server_results(
    out_dir: str | Path, subset: str, name: str, candidates: Mapping[str, str]
) -> Path:
    """``captions_<subset>_<name>_results.json`` in ``out_dir``; warns when the file does not
    cover the whole subset (the server refuses partial files)."""
    path = Path(out_dir) / f"captions_{subset}_{name}_results.json"
    rows = _int_ids(candidates, "the COCO server file")
    expected = COCO_SERVER_IMAGES.get(subset)
    if expected and len(rows) != expected:
        logger.warning(
            "%s holds %d images; the COCO server scores all %d of %s (dataset.max_test_images / "
            "max_val_images limit the split?)",
            path.name,
            len(rows),
            expected,
            subset,
        )
    return _write(path, rows)


def write_nocaps_submission(
    out_dir: str | Path, split: str, name: str, candidates: Mapping[str, str]
) -> Path:
    """``nocaps_<split>_<name>_evalai.json`` in ``out_dir``; warns when it does not cover the
    whole nocaps split (EvalAI refuses partial submissions)."""
    path = Path(out_dir) / f"nocaps_{split}_{name}_evalai.json"
    rows = _int_ids(candidates, "the nocaps EvalAI file")
    expected = NOCAPS_IMAGES.get(split)
    if expected and len(rows) != expected:
        logger.warning(
            "%s holds %d images; nocaps %s has %d and EvalAI scores them all",
            path.name,
            len(rows),
            split,
            expected,
        )
    return _write(path, rows)


def _finite(value: Any) -> Any:
    """NaN (SPICE's undefined per-image score) as None: JSON has no NaN."""
    return None if isinstance(value, float) and math.isnan(value) else value


def per_image_rows(
    candidates: Mapping[str, str],
    references: Mapping[str, list[str]],
    metrics: Mapping[str, Mapping[str, Any]] | None,
    domains: Mapping[str, str] | None = None,
    clip: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per image (sorted by id): id, caption, references, domain, every metric."""
    rows = []
    for image_id in sorted(candidates):
        row: dict[str, Any] = {
            "image_id": image_id,
            "caption": candidates[image_id],
            "references": list(references.get(image_id, [])),
        }
        if domains:
            row["domain"] = domains.get(image_id)
        for source in (metrics, clip):
            if source:
                row.update({k: _finite(v) for k, v in source[image_id].items()})
        rows.append(row)
    return rows


def worst_images(rows: list[dict[str, Any]], n: int, metric: str = WORST_BY) -> list[dict]:
    """The ``n`` rows lowest by ``metric`` (ties by image id); none without that metric."""
    scored = [r for r in rows if r.get(metric) is not None]
    return sorted(scored, key=lambda r: (r[metric], r["image_id"]))[:n]


def write_per_image(
    out_dir: str | Path, split: str, rows: list[dict[str, Any]], worst: list[dict[str, Any]]
) -> Path:
    """``<split>_per_image.json``: ``{"split", "worst_by", "worst": [...], "images": [...]}``."""
    path = Path(out_dir) / f"{split}_per_image.json"
    body = {"split": split, "worst_by": WORST_BY, "worst": worst, "images": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=1))
    return path


def write_evaluation_files(
    out_dir: str | Path,
    split: str,
    candidates: Mapping[str, str],
    report: dict[str, Any],
    *,
    name: str,
    source: str | None = None,
    file_names: Iterable[str | None] = (),
    references: Mapping[str, list[str]] | None = None,
    domains: Mapping[str, str] | None = None,
    per_image: bool = False,
    worst_n: int = 0,
) -> dict[str, str]:
    """Every file of an evaluation but the scores: ``<split>_results.json``, the nocaps EvalAI
    file (``source == "nocaps"``), the COCO server file (COCO 2014 images, by ``file_names``)
    and, with ``per_image``, the per-image file (the per-image scores that ``report`` and its
    ``clip`` section hold are moved out of them into it) whose ``worst_n`` worst images also go
    into ``report["worst_images"]``. Returns ``{kind: path}``."""
    out = Path(out_dir)
    files = {"results": out / f"{split}_results.json"}
    _write(files["results"], [{"image_id": k, "caption": v} for k, v in sorted(candidates.items())])
    if source == "nocaps":
        files["nocaps_evalai"] = write_nocaps_submission(out, split, name, candidates)
    subset = coco_subset(file_names)
    if subset is not None:
        files["coco_server"] = write_coco_server_results(out, subset, name, candidates)
    metrics = report.pop("per_image", None)
    clip = (report.get("clip") or {}).pop("per_image", None)
    if per_image:
        rows = per_image_rows(candidates, references or {}, metrics, domains, clip)
        report["worst_images"] = worst_images(rows, worst_n)
        files["per_image"] = write_per_image(out, split, rows, report["worst_images"])
    return {k: str(v) for k, v in files.items()}
