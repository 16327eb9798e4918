"""A real multi-node Ray cluster on this machine, with everything in S3 (a moto server on
127.0.0.1): a head with ``num_cpus=0`` (as the shipped KubeRay head) and two worker nodes of their
own raylets (``tests/multinode_cluster.py``, its own temp folder and ports, stopped by PID).

* A local ``exp.storage_path`` on this cluster is refused before anything starts.
* The whole flow with everything in S3, the shipped configs run as written: the RayJob's
  entrypoint (the command the RayCluster and AWS configs document too), submitted with
  ``ray job submit``, trains 2 workers on 2 nodes from S3 shards written by ``hericap prepare
  synthetic --out s3://...`` (starting from a checkpoint in S3: the seed's ``exp.checkpoint``),
  keeps checkpoints and the best in S3, and scores the test split
  with inference actors that get the best checkpoint from S3; a 2-trial sweep with its shards,
  trials, checkpoints and export in S3 is Ctrl-C'd, refused without ``--resume`` /
  ``--overwrite``, resumed (the finished trial is not rerun); the RayService's serve config and
  the one ``hericap serve --best s3://...`` writes for the sweep's export, deployed together
  with ``serve deploy``, serve both from S3; ``hericap caption`` captions with the best.

Only the sizes change (toy model, CPU, small data): each run's command is otherwise the shipped
one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import requests
import torch
import yaml
from helpers import free_port, jpeg, mlflow_client
from tiny_model import TINY_MODEL

from hericap.checkpoint import load_checkpoint, save_checkpoint
from hericap.cli import main
from hericap.config import load_config
from hericap.data.synthetic import iter_split
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.models.builder import build_captioner

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent
BUCKET = "hericap-test"
SHARDS = f"s3://{BUCKET}/hericap/coco"  # the RayJob's dataset.shard_dir
# The shipped commands at toy size on CPU: 2 workers of 2 CPUs each (worker nodes have 3, so
# each node holds one, and keeps a CPU for Ray Data), the tiny model, 64 x 64 images, one epoch.
CPU_TOY = [
    "exp.world_size=2",
    "exp.ngpus_per_node=0",
    "exp.cpus_per_worker=2",
    "exp.torch_threads=1",
    "dataset.resize=square",
    "dataset.image_size=64",
    "dataset.augment=none",
    "dataset.decode_concurrency=1",
    *TINY_MODEL,
    "model.use_reg_feat=False",
    "model.use_glob_feat=False",
    "model.frozen_stages=-1",
    "model.extractor.depths=[1,1]",
    "model.extractor.num_heads=[1,2]",
    "model.extractor.window_size=4",
    "model.extractor.extra_stage_dim=0",
    "optimizer.batch_size=8",
    "optimizer.num_workers=1",
    "optimizer.freezing_xe_epochs=0",
    "optimizer.freezing_sc_epochs=0",
    "optimizer.finetune_xe_epochs=1",
    "optimizer.finetune_sc_epochs=0",
    "optimizer.warmup_steps=2",
    "decode.val_beam_size=1",
    "decode.test_beam_size=2",
    "decode.max_len=8",
]


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (here: the cluster's own temp folder)."""
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
def cluster(ray_cluster, moto_server, tmp_path_factory):
    """The multi-node cluster (nodes inherit the S3 settings and this tree), a bucket, and the
    synthetic dataset at the RayJob's shard location, written by `hericap prepare`. The test
    session's local cluster runs beside it on the machine (``ray_cluster``), as another cluster
    may on a user's: jobs, sweeps and services must reach this one all the same."""
    import boto3

    temp = tempfile.mkdtemp(prefix="hcm", dir="/tmp")  # short: Ray's socket paths
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"  # the jobs' `python`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    log = (tmp_path_factory.mktemp("multinode") / "cluster.log").open("w")
    proc = subprocess.Popen(
        [
            *(sys.executable, str(REPO / "tests" / "multinode_cluster.py"), "--temp-dir", temp),
            *("--dashboard-port", str(free_port()), "--workers", "2", "--cpus", "3"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
        start_new_session=True,
    )
    try:
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=240)
        if not line or not line[0].strip():
            pytest.fail(f"the multi-node cluster did not come up (log: {log.name})")
        info = json.loads(line[0]) | {"env": env}
        boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=BUCKET)
        argv = ["prepare", "synthetic", "--out", SHARDS, "--min-count", "1", "--shard-rows", "32"]
        assert main([*argv, "--num-train", "64", "--num-val", "8", "--num-test", "8"]) == 0
        yield info
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_mentioning(temp):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            time.sleep(1)
        subprocess.run(["rm", "-rf", temp], check=False)
        log.close()


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _s3(moto_server: str):
    import boto3

    return boto3.client("s3", endpoint_url=moto_server)


def _keys(s3, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def _job(cluster: dict, argv: list[str], runtime_env: dict, timeout: float = 600) -> str:
    """``ray job submit`` ``argv``, wait for the end; returns the logs (asserts success)."""
    ray, address, env = str(BIN / "ray"), cluster["dashboard"], cluster["env"]
    job_id = f"hericap-{os.getpid()}-{int(time.time())}"
    deadline = time.time() + 300
    while True:  # the head's job agent comes up after the nodes (minutes on a loaded machine)
        submit = subprocess.run(
            [
                *(ray, "job", "submit", "--address", address, "--submission-id", job_id),
                *("--no-wait", "--runtime-env-json", json.dumps(runtime_env), "--", *argv),
            ],
            env=env,
            capture_output=True,
            text=True,
        )
        if "No available agent" not in submit.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stderr[-3000:]
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline:
        status = subprocess.run(
            [ray, "job", "status", "--address", address, job_id],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.upper()
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run(
        [ray, "job", "logs", "--address", address, job_id], env=env, capture_output=True, text=True
    ).stdout
    if "SUCCEEDED" not in status:  # what the cluster held, for the failure's message
        state = _cluster_state(cluster, driver=argv[1])
        subprocess.run([ray, "job", "stop", "--address", address, job_id], env=env, timeout=60)
        pytest.fail(f"{status}\n{logs[-5000:]}\n{state}")
    return logs


def _cluster_state(cluster: dict, driver: str) -> str:
    """What the cluster holds when a job does not succeed: ``ray status``, placement groups,
    live actors, the dead actors' causes, the job driver's Python stacks (py-spy) and the tail
    of Ray Data's log."""
    ray, address, env = str(BIN / "ray"), cluster["dashboard"], cluster["env"]
    ask = functools.partial(subprocess.run, env=env, capture_output=True, text=True, timeout=60)
    parts = [
        ask([ray, *cmd]).stdout[-2000:]
        for cmd in (
            ("status", "--address", cluster["address"]),
            ("list", "placement-groups", "--address", address),
            ("list", "actors", "--filter", "state!=DEAD", "--address", address),
        )
    ]
    dead_actors = ("list", "actors", "--filter", "state=DEAD", "--detail", "--format", "json")
    dead = ask([ray, *dead_actors, "--address", address]).stdout
    with contextlib.suppress(ValueError):
        for actor in json.loads(dead or "[]"):
            cause = json.dumps(actor.get("death_cause"))[:600]
            parts.append(f"dead {actor.get('class_name')} pid {actor.get('pid')}: {cause}")
    py_spy = BIN / "py-spy"  # installed with ray[serve]'s dependencies
    for pid in _pids_mentioning(driver) if py_spy.exists() else []:
        parts.append(ask([str(py_spy), "dump", "--pid", str(pid)]).stdout[-4000:])
    logs = Path(cluster["temp_dir"], "session_latest", "logs")
    for log in sorted(logs.glob("ray-data*/*.log")) + sorted(logs.glob("ray-data*.log")):
        parts.append(f"{log.name}:\n" + "\n".join(log.read_text().splitlines()[-40:]))
    return "\n".join(parts)


def _wait_healthy(url: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(requests.RequestException):
            r = requests.get(f"{url}/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        time.sleep(2)
    pytest.fail(f"{url} did not become healthy in {timeout:.0f}s")


def _caption(url: str) -> dict:
    from skimage import data

    r = requests.post(
        f"{url}/caption",
        data=jpeg(data.astronaut()),
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_a_local_storage_path_on_a_multi_node_cluster_is_refused_before_anything_starts(
    cluster, tmp_path
):
    cmd = [sys.executable, "-m", "hericap.cli", "train", "preset=demo", *CPU_TOY]
    cmd += [f"dataset.shard_dir={SHARDS}", f"exp.output_dir={tmp_path}"]
    cmd += [f"exp.storage_path={tmp_path / 'runs'}", f"exp.ray_address={cluster['address']}"]
    out = subprocess.run([*cmd, "--no-test"], env=cluster["env"], capture_output=True, text=True)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"exp.storage_path={tmp_path / 'runs'} is a path on this machine" in out.stderr
    assert "3 nodes" in out.stderr and "s3://" in out.stderr and "file://" in out.stderr
    assert not (tmp_path / "runs").exists()


def _finished_trials(temp_dir: str) -> dict[str, str]:
    """Trial folder name -> result.json text, for the trials whose last result says done, from
    the Tune driver's own folder (this machine: the head node's session folder)."""
    out = {}
    for path in Path(temp_dir).glob("session_*/artifacts/*/sweep/driver_artifacts/*/result.json"):
        text = path.read_text()
        if '"done": true' in text:
            out[path.parent.name] = text
    return out


def _start_checkpoint(args: list[str]) -> tuple[str, Vocabulary]:
    """A checkpoint in S3 to start from (the seed's ``exp.checkpoint=PATH``): the job's model,
    other initial weights, and a vocabulary that is not the dataset's (an extra word)."""
    cfg = load_config(args)
    captions = [c for s in iter_split(0, "train", 64) for c in s.captions]
    vocab = Vocabulary([*Vocabulary.build(captions, min_count=1).itos, "zebra"])
    torch.manual_seed(99)
    model = build_captioner(cfg.model, len(vocab), resize_spec(cfg.dataset).model_size)
    location = f"s3://{BUCKET}/hericap/start"
    save_checkpoint(location, model, cfg, vocab, meta={"epoch": 0})
    return location, vocab


def _run_the_rayjob(cluster: dict, s3, tmp_path: Path) -> None:
    """The RayJob's entrypoint through `ray job submit`: trains 2 workers on the 2 worker nodes
    from the S3 shards, starting from the weights and vocabulary of a checkpoint in S3 (a
    backbone LR of 0 keeps its extractor exactly as it was), keeps checkpoints, the best and the
    run folder in S3, and scores the test split with inference actors that get the best
    checkpoint from S3."""
    job = _yaml("kuberay/rayjob.yaml")["spec"]
    python, script, *args = shlex.split(job["entrypoint"])
    script = str(REPO / script.removeprefix("/home/ray/hericap/"))  # the image's WORKDIR
    args = [a.replace("BUCKET", BUCKET) for a in args]
    start, start_vocab = _start_checkpoint([*args, *CPU_TOY])
    warm = [f"exp.checkpoint={start}", "optimizer.xe_backbone_lr=0"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    # MLflow: a store every node reaches (here: a folder of this machine, where all nodes run)
    store = tmp_path / "mlruns"
    runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] = store.as_uri()
    tracked = ["exp.tracking=mlflow"]
    logs = _job(cluster, [python, script, *args, *CPU_TOY, *warm, *tracked], runtime_env)
    assert f"Ray: cluster at {cluster['address']}, 3 node(s)" in logs  # this cluster's driver
    assert "best checkpoint: epoch 1" in logs and "CIDEr" in logs  # trained, then scored test
    assert f"initialised from the weights of {start}" in logs

    keys = _keys(s3, "hericap/")
    assert any(k.startswith("hericap/runs/train/checkpoint_") for k in keys)
    assert {"hericap/runs/best/model.pt", "hericap/runs/best/meta.json"} <= keys
    run = "hericap/outputs/caption_finetune_region"  # the run folder, in S3 too
    assert {f"{run}/metrics.csv", f"{run}/test_scores.json"} <= keys
    best = load_checkpoint(f"s3://{BUCKET}/hericap/runs/best")
    assert best.meta["epoch"] == 0 and best.meta["worker_nodes"] == 2  # DDP across 2 nodes
    assert best.vocab == start_vocab  # the start checkpoint's vocabulary, not the dataset's
    initial, trained = load_checkpoint(start).model.state_dict(), best.model.state_dict()
    assert all(torch.equal(trained[k], initial[k]) for k in initial if k.startswith("extractor."))
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if k.startswith("decoder."))
    scores = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{run}/test_scores.json")["Body"].read())
    assert scores["num_images"] == 8 and scores["checkpoint"] == f"s3://{BUCKET}/hericap/runs/best"
    assert f"{run}/curves.png" in keys and not any(k.startswith(f"{run}/tensorboard") for k in keys)
    # the MLflow run: logged live by rank 0 on a worker node, then the test scores and the
    # files from the run folder in S3 by the job's driver
    client = mlflow_client(store)
    (found,) = client.search_runs(
        [client.get_experiment_by_name("caption_finetune_region").experiment_id]
    )
    assert found.info.status == "FINISHED" and found.data.params["exp.tracking"] == "mlflow"
    assert found.data.metrics["test/CIDEr"] == pytest.approx(scores["metrics"]["CIDEr"])
    assert found.data.metrics["epoch/val_CIDEr"] == pytest.approx(best.meta["val_CIDEr"])
    artefacts = {f.path for f in client.list_artifacts(found.info.run_id)}
    assert artefacts == {"curves.png", "metrics.csv", "best_config.json", "test_scores.json"}


def _run_the_sweep(cluster: dict, s3, tmp_path: Path) -> str:
    """`hericap tune` on the cluster with --output-dir in S3, Ctrl-C'd (SIGINT) as soon as its
    first trial has finished, while the second one runs; the same command again is refused
    (neither --resume nor --overwrite); --resume restores it (Tuner.restore) without rerunning
    the finished trial, and exports the best trial's checkpoint to S3. Returns the sweep."""
    sweeps = f"s3://{BUCKET}/sweeps"
    experiment = "sweeps/tiny/sweep"
    common = ["--space", str(REPO / "tune_spaces" / "tiny_cpu.yaml"), "--name", "tiny"]
    # exp.tracking=mlflow: one MLflow run per trial, in the experiment "tiny"
    common += [f"dataset.shard_dir={sweeps}/shards", "exp.tracking=mlflow", "--output-dir", sweeps]
    store = tmp_path / "sweep_mlruns"
    env = cluster["env"] | {"MLFLOW_TRACKING_URI": store.as_uri()}
    cmd = [sys.executable, "-m", "hericap.cli", "tune", *common]
    cmd += ["--ray-address", cluster["address"]]
    log_path = tmp_path / "tune.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 420
        while not _finished_trials(cluster["temp_dir"]) and proc.poll() is None:
            assert time.monotonic() < deadline, "no trial finished in 7 minutes"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text()
    assert code == 130, log[-3000:]
    assert "1 of 2 trials unfinished" in log and "--resume" in log, log[-3000:]
    assert not _keys(s3, "sweeps/tiny/best/")  # no partial "best" exported
    finished = _finished_trials(cluster["temp_dir"])
    assert len(finished) == 1

    def results_in_s3() -> dict[str, bytes]:
        return {
            key.split("/")[-2]: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            for key in _keys(s3, experiment + "/")
            if key.endswith("/result.json")
        }

    before = results_in_s3()
    assert set(finished) <= set(before)
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": store.as_uri()}):
        assert main(["tune", *common]) == 2  # refused before Ray starts: nothing is replaced

    resume = subprocess.run([*cmd, "--resume"], cwd=REPO, capture_output=True, text=True, env=env)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    summary = json.loads(resume.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 2 and summary["best"] == f"{sweeps}/tiny/best"
    after = results_in_s3()
    assert len(after) == 2 and all(after[t] == before[t] for t in finished)
    rows = s3.get_object(Bucket=BUCKET, Key="sweeps/tiny/results.csv")["Body"].read().decode()
    assert len(rows.splitlines()) == 3 and "decoder_name" in rows.splitlines()[0]
    assert {"sweeps/tiny/trials.png", "sweeps/tiny/best/model.pt"} <= _keys(s3, "sweeps/tiny/")
    trial = json.loads(
        s3.get_object(Bucket=BUCKET, Key="sweeps/tiny/best/trial.json")["Body"].read()
    )
    saved = json.loads(
        s3.get_object(Bucket=BUCKET, Key="sweeps/tiny/best/config.json")["Body"].read()
    )
    assert (
        saved["model"]["cap_generator"]["decoder_name"]
        == trial["params"]["model.cap_generator.decoder_name"]
    )
    # MLflow: one finished run per trial, side by side in the sweep's experiment
    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    done = [r for r in runs if r.info.status == "FINISHED"]
    statuses = [(r.info.run_name, r.info.status) for r in runs]
    assert len({r.info.run_name for r in done}) == 2, statuses
    for run in done:
        assert "val_CIDEr" in run.data.metrics
        assert run.data.params["model.cap_generator.decoder_name"] in ("Parallel", "Sequential")
    return f"{sweeps}/tiny"


def _serve_both(cluster: dict, sweep: str, tmp_path: Path) -> None:
    """One `serve deploy` of the RayService's application (the RayJob's best, from S3) and of
    the one `hericap serve --best SWEEP --write-config` writes for the sweep's export: their
    replicas, on the worker nodes, load the checkpoints from S3 themselves."""
    service = yaml.safe_load(_yaml("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = service["applications"]
    app["args"]["checkpoint"] = app["args"]["checkpoint"].replace("BUCKET", BUCKET)
    assert app["args"]["checkpoint"] == f"s3://{BUCKET}/hericap/runs/best"
    # CPU replicas of 1 CPU (the shipped ones take a GPU and 4 CPUs)
    app["args"] |= {"num_cpus": 1, "num_gpus": 0, "torch_threads": 1}
    app["args"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    written = tmp_path / "sweep_serve.yaml"
    assert main(["serve", "--best", sweep, "--write-config", str(written)]) == 0
    (swept,) = yaml.safe_load(written.read_text())["applications"]
    assert swept["args"]["checkpoint"] == f"{sweep}/best"
    swept |= {"name": "sweep", "route_prefix": "/sweep", "runtime_env": app["runtime_env"]}
    port = free_port()
    service["applications"].append(swept)
    service["http_options"] = {"host": "127.0.0.1", "port": port}  # what KubeRay sets
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(service))
    serve = [str(BIN / "serve"), "deploy", str(config), "--address", cluster["dashboard"]]
    deployed = subprocess.run(serve, env=cluster["env"], capture_output=True, text=True)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    try:
        assert _wait_healthy(url)["model"] == "runs/epoch1"
        assert _caption(url)["model"] == "runs/epoch1"
        assert _wait_healthy(f"{url}/sweep")["model"].startswith("tiny/epoch")
        assert _caption(f"{url}/sweep")["caption"]
    finally:
        shutdown = [str(BIN / "serve"), "shutdown", "-y", "--address", cluster["dashboard"]]
        subprocess.run(shutdown, env=cluster["env"], capture_output=True)


@pytest.mark.java  # the RayJob scores the test split with the coco-caption toolkit
def test_the_shipped_configs_train_score_tune_and_serve_from_s3_on_two_nodes(
    cluster, moto_server, tmp_path, capsys
):
    """prepare (the fixture) -> train -> eval -> tune -> serve -> caption, everything in S3:
    the RayJob, a sweep, the RayService with the sweep's export beside it, `hericap caption`."""
    from skimage import data

    s3 = _s3(moto_server)
    _run_the_rayjob(cluster, s3, tmp_path)
    sweep = _run_the_sweep(cluster, s3, tmp_path)
    _serve_both(cluster, sweep, tmp_path)
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(jpeg(data.astronaut()))
    capsys.readouterr()
    assert main(["caption", str(photo), "--checkpoint", f"s3://{BUCKET}/hericap/runs/best"]) == 0
    assert capsys.readouterr().out.startswith(f"{photo}\t")
