"""Shared fixtures: tiny synthetic shards, the real-data folder, one local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hericap.data.prepare import prepare_synthetic
from hericap.data.shards import Manifest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    """A small synthetic dataset (256 / 32 / 32 images, several shards per split)."""
    out = tmp_path_factory.mktemp("tiny_shards")
    return prepare_synthetic(
        out,
        num_train=256,
        num_val=32,
        num_test=32,
        seed=7,
        image_size=64,
        min_count=1,
        shard_rows=100,
        progress=False,
    )


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``$HERICAP_REALDATA`` (set by .ci/run); tests using it skip with a reason when unset."""
    root = os.environ.get("HERICAP_REALDATA")
    if not root:
        pytest.skip("HERICAP_REALDATA is not set (CI sets it to ../shared/realdata)")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"HERICAP_REALDATA={root} is not a folder")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs on this 2-core machine)."""
    ray = pytest.importorskip("ray")
    from hericap.training.ray_utils import init_ray

    started = init_ray(num_cpus=4)
    yield ray
    if started:
        ray.shutdown()
