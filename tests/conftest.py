"""Shared fixtures: tiny synthetic shards, the real-data folder, one local Ray cluster, a moto
S3 server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
from helpers import free_port

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
def coco_scorer():
    """One coco-caption toolkit scorer (one METEOR JVM, ~6-10 s to start) for every Java test
    module that scores captions."""
    from hericap.evaluation.coco_metrics import CocoScorer

    with CocoScorer() as scorer:
        yield scorer


# Files every real-data test may rely on: when HERICAP_REALDATA is set, they must be there.
REALDATA_FILES = (
    "flickr8k/dataset_flickr8k.json",
    "coco/captions_val2017.json",
    "coco-caption/captions_val2014_fakecap_subset_gt.json",
    "research_checkpoints/README.md",
)


@pytest.fixture(scope="session")
def realdata() -> Path:
    """``$HERICAP_REALDATA`` (set by .ci/run). Unset: tests using it skip with a reason. Set but
    missing files: they fail, so a broken CI set-up never passes as skipped tests."""
    root = os.environ.get("HERICAP_REALDATA")
    if not root:
        pytest.skip("HERICAP_REALDATA is not set (CI sets it to ../shared/realdata)")
    path = Path(root)
    missing = [f for f in REALDATA_FILES if not (path / f).is_file()]
    if missing:
        pytest.fail(f"HERICAP_REALDATA={root} is set but lacks {missing}")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``java`` tests skip (with the reason) where no Java runs; ``gpu`` tests where no CUDA
    device is present."""
    import shutil

    import torch

    no_java = pytest.mark.skip(reason="needs Java for the coco-caption toolkit (none on PATH)")
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none present)")
    has_java, has_gpu = shutil.which("java") is not None, torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("java") and not has_java:
            item.add_marker(no_java)
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(no_gpu)


def _ray_processes() -> list[psutil.Process]:
    """This process's children that Ray started (GCS, raylet, dashboard, ...; their executables
    and scripts live in Ray's package) and all their descendants; not the other fixtures'
    processes (the moto server, the METEOR JVM), which Ray's shutdown does not stop."""
    import ray

    package = os.path.dirname(ray.__file__) + os.sep
    found = []
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if any(part.startswith(package) for part in child.cmdline()[:2]):
                found += [child, *child.children(recursive=True)]
    return found


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs on this 2-core machine)."""
    ray = pytest.importorskip("ray")
    from hericap.runtime.cluster import init_ray

    started = init_ray(num_cpus=4)
    yield ray
    if started:
        # the cluster's processes (GCS, raylet and every worker it forked) are this process's
        # descendants now; a worker that outlives shutdown (a Train controller left by the
        # interrupted sweep was one) is stopped here by PID rather than left to the machine
        descendants = _ray_processes()
        ray.shutdown()
        _, alive = psutil.wait_procs(descendants, timeout=20)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                name = " ".join(proc.cmdline())[:120]
                proc.kill()
                warnings.warn(
                    f"Ray process {proc.pid} ({name}) outlived ray.shutdown(); killed",
                    stacklevel=2,
                )


@pytest.fixture(scope="session")
def moto_server():
    """``moto_server`` (moto[server]) on a free port of 127.0.0.1, stopped by PID afterwards."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        )
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=url,
    )
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
