"""``hericap tune``: a Ray Tune + Optuna sweep over a space file."""

from __future__ import annotations

import argparse
import json
import logging

from hericap.cli.common import EXIT_INTERRUPTED

logger = logging.getLogger(__name__)


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune + Optuna + ASHA sweep over a space file; exports the best trial."""
    from hericap.data import storage
    from hericap.runtime.cluster import ray_session
    from hericap.runtime.preflight import check_tracking
    from hericap.tune.sweep import (
        SweepInterruptedError,
        claim_sweep,
        load_space,
        run_sweep,
    )

    storage.check_location(args.output_dir, "--output-dir")
    space = load_space(args.space, args.overrides)  # every value a trial can get is checked
    name = args.name or storage.basename(args.space).removesuffix(".yml").removesuffix(".yaml")
    sweep_root = storage.join(storage.resolve(args.output_dir), name)
    # before Ray starts; --overwrite deletes only once every check has passed (in run_sweep)
    check_tracking(space.base_config().exp.tracking, args.output_dir, "--output-dir")
    claim_sweep(sweep_root, args.resume, args.overwrite, delete=False)
    try:
        # a local cluster gets the preset's logical CPUs (demo: 4), as `hericap train` does: on
        # 2 cores, 2 CPUs leave Ray Data's read tasks none beside a trial's workers (deadlock)
        with ray_session(args.ray_address, space.base_config().exp.ray_num_cpus):
            summary = run_sweep(
                space, name, args.output_dir, resume=args.resume, overwrite=args.overwrite
            )
    except SweepInterruptedError as e:
        logger.error("%s", e)
        return EXIT_INTERRUPTED
    print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tune`` command."""
    tu = sub.add_parser("tune", help="Ray Tune + Optuna sweep (tune_spaces/*.yaml)")
    tu.add_argument("--space", required=True, help="a space file, e.g. tune_spaces/tiny_cpu.yaml")
    tu.add_argument("overrides", nargs="*", help="fixed key=value overrides for every trial")
    tu.add_argument("--name", default=None, help="sweep name (default: the space file's stem)")
    tu.add_argument(
        "--output-dir", default="outputs", help="sweeps go to OUTPUT_DIR/NAME (a folder or URI)"
    )
    tu.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    tu.add_argument(
        "--overwrite", action="store_true", help="delete a previous sweep of this name first"
    )
    tu.add_argument("--ray-address", default=None, help="Ray cluster (default: local)")
    tu.set_defaults(func=cmd_tune)
