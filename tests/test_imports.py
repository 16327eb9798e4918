"""Only the layers that run things on Ray import Ray."""

from __future__ import annotations

import subprocess
import sys

RAY_FREE = [
    "hericap.config",
    "hericap.data.synthetic",
    "hericap.data.shards",
    "hericap.data.text",
    "hericap.data.transforms",
    "hericap.data.augment",
    "hericap.training.phases",
    "hericap.training.run_logs",
    "hericap.data.prepare",
    "hericap.models",
    "hericap.evaluation.coco_metrics",
    "hericap.evaluation.semantic",
    "hericap.evaluation.report",
    "hericap.evaluation.inference",
    "hericap.training.checkpoint",
    "hericap.training.optim",
    "hericap.training.scst",
    "hericap.training.xe",
    "hericap.evaluation.cider",
    "hericap.data.ptb",
    "hericap.data.readers",
    "hericap.data.storage",
    "hericap.models.region",
    "hericap.models.global_encoder",
    "hericap.models.routing",
    "hericap.models.grit_checkpoint",
    "hericap.serve.images",
    "hericap.serve.service",
    "hericap.evaluation.explain",
]


def test_library_imports_without_ray():
    code = (
        "import sys\n"
        f"for m in {RAY_FREE!r}:\n"
        "    __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad[:5])\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"Ray imported by the library: {proc.stdout} {proc.stderr}"


def test_ray_layers_do_import_ray():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, hericap.data.pipeline; sys.exit(0 if 'ray' in sys.modules else 1)",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
