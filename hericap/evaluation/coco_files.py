"""COCO-format caption files: the annotations (``{"annotations": [{"image_id", "caption"}]}``)
and results (``[{"image_id", "caption"}]``) that the coco-caption workflow scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hericap.data import storage

__all__ = ["load_annotations", "load_results", "references_for"]


def _read_json(path: str | Path, what: str) -> Any:
    """A JSON file (a local path or a URI)."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} file not found: {path}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e


def _key(image_id: Any) -> str:
    return str(image_id)


def load_annotations(path: str | Path) -> dict[str, list[str]]:
    """``{image_id: [caption, ...]}`` from a COCO caption annotation file."""
    data = _read_json(path, "annotations")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise ValueError(f"{path}: a COCO annotation file holds an 'annotations' list")
    refs: dict[str, list[str]] = {}
    for i, a in enumerate(anns):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise ValueError(f"{path}: annotation {i} lacks an image_id or a caption string")
        refs.setdefault(_key(a["image_id"]), []).append(a["caption"])
    return refs


def load_results(path: str | Path) -> dict[str, str]:
    """``{image_id: caption}`` from a COCO results file (one caption per image)."""
    data = _read_json(path, "results")
    if not isinstance(data, list):
        raise ValueError(f"{path}: a COCO results file is a list of {{image_id, caption}}")
    out: dict[str, str] = {}
    for i, r in enumerate(data):
        if not isinstance(r, dict) or "image_id" not in r or not isinstance(r.get("caption"), str):
            raise ValueError(f"{path}: result {i} lacks an image_id or a caption string")
        key = _key(r["image_id"])
        if key in out:
            raise ValueError(f"{path}: image {r['image_id']} has more than one result")
        out[key] = r["caption"]
    return out


def references_for(results: dict[str, str], annotations: dict[str, list[str]]) -> dict:
    """The references of the result images (the toolkit scores the images in the results)."""
    missing = sorted(set(results) - set(annotations))
    if missing:
        raise ValueError(f"{len(missing)} result images have no annotations, e.g. {missing[:5]}")
    return {k: annotations[k] for k in results}
