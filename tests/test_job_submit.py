"""`ray job submit` against a real single-node Ray head on 127.0.0.1.

The head runs in its own temp folder on its own ports, beside the session's local cluster, and
is stopped by the PIDs of its own processes (never `ray stop`, which stops every Ray process of
the user). `ray start` turns token authentication on, so the `ray job` client runs with
RAY_AUTH_MODE=token (RAY_NOTES.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import free_ports
from tiny_model import TINY_MODEL

from hericap.checkpoint import load_checkpoint, save_checkpoint
from hericap.config import load_config
from hericap.data.text import Vocabulary
from hericap.models.builder import build_captioner

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (here: the head's own temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head --block` on 127.0.0.1 with its own temp folder; yields the
    dashboard (job API) address and the environment for `ray job` clients."""
    temp = tempfile.mkdtemp(prefix="hcj", dir="/tmp")  # short: Ray's socket paths
    gcs, dash, client, agent, agent_grpc, metrics, rt_env = free_ports(7)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the job's python
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_env}",
            f"--temp-dir={temp}",
            "--num-cpus=2",  # 1 training worker + Ray Data read/decode tasks
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    client_env = {**env, "RAY_AUTH_MODE": "token"}
    try:
        deadline = time.time() + 120
        while True:
            up = subprocess.run(
                [RAY, "job", "list", "--address", address],
                env=client_env,
                capture_output=True,
                text=True,
            )
            if up.returncode == 0:
                break
            if time.time() > deadline or head.poll() is not None:
                pytest.fail(f"the Ray head did not come up: {up.stderr[-2000:]}")
            time.sleep(2)
        yield address, client_env
    finally:
        # `ray start --block` stops its processes on SIGTERM within seconds when idle, but took
        # over 30 s after a job had run; past a short grace, its processes are stopped by PID
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            head.kill()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_mentioning(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(2)
        subprocess.run(["rm", "-rf", temp], check=False)


def _start_checkpoint(folder: Path) -> tuple[Path, Vocabulary]:
    """A checkpoint to start from: the submitted run's model, other initial weights, and a
    vocabulary that is not the dataset's (an extra word)."""
    from hericap.data.synthetic import iter_split

    cfg = load_config(["preset=demo", *TINY_MODEL])
    captions = [c for s in iter_split(0, "train", 64) for c in s.captions]
    vocab = Vocabulary([*Vocabulary.build(captions, min_count=1).itos, "zebra"])
    torch.manual_seed(99)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    save_checkpoint(folder, model, cfg, vocab, meta={"epoch": 0})
    return folder, vocab


def test_ray_job_submit_trains_on_a_running_cluster(ray_head, tmp_path):
    """What the README shows: `ray job submit --working-dir . --runtime-env
    cluster/runtime_env.yaml -- python jobs/train_caption.py ...`, then status and logs. The
    seed's `exp.checkpoint=PATH` starts the run from that checkpoint's weights and vocabulary
    (a backbone LR of 0 keeps its extractor exactly as it was)."""
    address, env = ray_head
    start, start_vocab = _start_checkpoint(tmp_path / "start")
    job_id = f"hericap-test-{os.getpid()}"
    out = tmp_path / "outputs"
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job_id,
            "--no-wait",
            "--working-dir",
            str(REPO),
            "--runtime-env",
            str(REPO / "cluster" / "runtime_env.yaml"),
            "--",
            "python",
            "jobs/train_caption.py",
            "preset=demo",
            "exp.name=submitted",
            f"exp.output_dir={out}",
            "dataset.synthetic_train=64",
            "dataset.synthetic_val=8",
            "dataset.synthetic_test=8",
            "dataset.vocab_min_count=1",
            *TINY_MODEL,
            "optimizer.batch_size=8",
            "optimizer.finetune_xe_epochs=1",
            "optimizer.finetune_sc_epochs=0",
            f"exp.checkpoint={start}",
            "optimizer.xe_backbone_lr=0",
            # one worker: a second costs ~14 s of start-up on 2 cores; DDP is tested elsewhere
            "exp.world_size=1",
            "--no-test",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert submit.returncode == 0, submit.stderr[-3000:]

    deadline, status = time.time() + 400, ""
    while time.time() < deadline:
        status = subprocess.run(
            [RAY, "job", "status", "--address", address, job_id],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.upper()  # "Job 'ID' succeeded" / "Status for job 'ID': SUCCEEDED"
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run(
        [RAY, "job", "logs", "--address", address, job_id],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert "SUCCEEDED" in status, f"{status}\n{logs[-4000:]}"
    assert "best checkpoint: epoch 1" in logs
    ckpt = load_checkpoint(out / "submitted" / "best")
    assert ckpt.meta["epoch"] == 0 and ckpt.config.exp.name == "submitted"
    assert f"initialised from the weights of {start}" in logs
    assert ckpt.vocab == start_vocab  # the checkpoint's vocabulary, not the dataset's
    initial = load_checkpoint(start).model.state_dict()
    trained = ckpt.model.state_dict()
    extractor = [k for k in initial if k.startswith("extractor.")]
    assert all(torch.equal(trained[k], initial[k]) for k in extractor)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.startswith("decoder."))
