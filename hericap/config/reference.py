"""The configuration reference (``docs/configuration.md``), generated from the schema itself:
every key with its type, its default and the comment above it in :mod:`hericap.config.schema`,
so the reference cannot drift from the code (a test regenerates it and compares).

    python -m hericap.config.reference > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys

from hericap.config import schema
from hericap.config.loader import list_presets

__all__ = ["field_comments", "reference_markdown"]


def field_comments(cls: type) -> dict[str, str]:
    """``{field: the comment lines right above it}`` of a dataclass, from its source."""
    lines = inspect.getsource(cls).splitlines()
    comments: dict[str, str] = {}
    for node in ast.parse(inspect.getsource(cls)).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        comments[node.target.id] = " ".join(above)
    return comments


def _rows(cls: type, prefix: str) -> list[str]:
    rows: list[str] = []
    comments = field_comments(cls)
    nested: list[tuple[type, str]] = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
            if dataclasses.is_dataclass(default):
                nested.append((type(default), f"{prefix}{f.name}."))
                continue
        else:
            default = f.default
        doc = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | `{f.type}` | `{default!r}` | {doc} |")
    for sub, sub_prefix in nested:
        rows += _rows(sub, sub_prefix)
    return rows


def reference_markdown() -> str:
    """The whole reference page."""
    sections = [
        "# Configuration reference",
        "",
        "Generated from `hericap/config/schema.py` by `python -m hericap.config.reference` (a "
        "test checks it is current). Every entrypoint takes these keys as dotted overrides "
        "(`optimizer.batch_size=32`); `preset=NAME` picks a preset "
        f"({', '.join(f'`{p}`' for p in list_presets())}, in `hericap/config/presets/`). An "
        "unknown key, a wrong type or an impossible value is an error before anything runs.",
        "",
    ]
    for f in dataclasses.fields(schema.Config):
        if f.default_factory is dataclasses.MISSING:
            continue
        cls = type(f.default_factory())
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        sections += [
            f"## `{f.name}.*`",
            "",
            doc,
            "",
            "| key | type | default | what it does |",
            "|---|---|---|---|",
            *_rows(cls, f"{f.name}."),
            "",
        ]
    comments = field_comments(schema.Config)
    top = [
        f"| `{f.name}` | `{f.type}` | `{f.default!r}` | {comments.get(f.name, '')} |"
        for f in dataclasses.fields(schema.Config)
        if f.default_factory is dataclasses.MISSING
    ]
    sections += [
        "## Top-level keys",
        "",
        "| key | type | default | what it does |",
        "|---|---|---|---|",
    ]
    sections += top
    return "\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
