"""HeriCap vs the research code itself, on the oracle (``$HERICAP_REALDATA/research_checkpoints``).

For each oracle model (GRIT Parallel, HierCap Concatenated_Parallel, HierCap Sequential): import
its research checkpoint with ``hericap import``'s code, run HeriCap on the oracle's inputs and
compare every stage the research code saved: preprocessing (our transform of the photos),
detector outputs, deformable-decoder states, grid/global encoder outputs, teacher-forced
log-probs, beam searches (beam 5 and 3, one and five outputs) and each image alone. Prints, as
one JSON object on its last line, the largest absolute difference per stage and model,
``identical_beam_share`` (the oracle's beams reproduced token for token; goal 1.0) and
``caption_equal_share`` (decoded captions, plain and with the research evaluation's
repeated-word collapse, equal to the research ones).

    HERICAP_REALDATA=../shared/realdata python benchmarks/bench_parity.py [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from hericap.evaluation.research_parity import (
    NOISE,
    ORACLE_MODELS,
    compare_with_oracle,
    import_oracle_model,
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the oracle used 1)")
    args = ap.parse_args(argv)
    root = os.environ.get("HERICAP_REALDATA")
    if not root:
        raise SystemExit("set HERICAP_REALDATA (the folder holding research_checkpoints/)")
    oracle = Path(root) / "research_checkpoints"
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models, identical, total, equal, captions = {}, 0, 0, 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ORACLE_MODELS:
            loaded = import_oracle_model(oracle, name, Path(tmp) / name)
            result = compare_with_oracle(loaded, oracle, name)
            models[name] = {k: float(f"{v:.3g}") for k, v in result.max_abs_diff.items()}
            if result.mismatched_beams:
                models[name]["mismatched_beams"] = result.mismatched_beams
            identical += result.beams_identical
            total += result.beams_total
            equal += result.captions_equal
            captions += result.captions_total
            print(f"{name}: {json.dumps(models[name])}", flush=True)
    report = {
        "max_abs_diff": models,
        "identical_beam_share": identical / total,
        "beams": total,
        "caption_equal_share": equal / captions,
        "research_float32_noise": NOISE,
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
