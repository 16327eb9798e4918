"""The cluster configs in cluster/ parse and agree with each other and with the code: one
image, Ray and Python versions pyproject.toml allows, GPU counts, one runtime env, entrypoints."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from hericap.config import load_config
from hericap.serve.app import DEFAULTS

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_every_config_runs_the_image_the_dockerfile_builds():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    assert base, "Dockerfile must build FROM rayproject/ray:<ray>-py<XY>-gpu"
    ray_version, py = base.group(1), (int(base.group(2)), int(base.group(3)))
    # the image's Ray and Python are ones pyproject.toml allows
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray_req,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "ray"]
    assert ray_req.specifier.contains(ray_version), (ray_version, str(ray_req))
    assert SpecifierSet(project["requires-python"]).contains(f"{py[0]}.{py[1]}"), py
    tag = re.search(r"-t (\S+) \.", dockerfile).group(1)
    assert f"ray{ray_version}-py{py[0]}{py[1]}" in tag

    cluster = _yaml("kuberay/raycluster.yaml")
    job = _yaml("kuberay/rayjob.yaml")
    service = _yaml("kuberay/rayservice.yaml")
    images = {_yaml("aws.yaml")["docker"]["image"]}
    for spec in (
        cluster["spec"],
        job["spec"]["rayClusterSpec"],
        service["spec"]["rayClusterConfig"],
    ):
        assert spec["rayVersion"] == ray_version
        images |= {c["image"] for c in _containers(spec)}
    assert images == {tag}
    # the RayJob / RayService clusters are the RayCluster's
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]


def test_gpu_counts_agree_and_fit_the_training_command():
    aws = _yaml("aws.yaml")
    worker = aws["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"] == "p4de.24xlarge"  # 8x A100 80 GB
    assert worker["resources"]["GPU"] == 8
    assert aws["available_node_types"][aws["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert all("127.0.0.1" in c for c in aws["head_start_ray_commands"] if "--head" in c)

    spec = _yaml("kuberay/raycluster.yaml")["spec"]
    (group,) = spec["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 8 == int(group["rayStartParams"]["num-gpus"])
    assert group["replicas"] * gpus == worker["max_workers"] * worker["resources"]["GPU"]

    entry = shlex.split(_yaml("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    overrides = [a for a in entry[2:] if "=" in a]
    cfg = load_config(overrides)  # the RayJob's command is a valid HeriCap command line
    assert cfg.exp.ngpus_per_node > 0 and cfg.exp.world_size <= group["replicas"] * gpus


def test_runtime_env_is_shared_and_entrypoints_exist():
    env = _yaml("runtime_env.yaml")
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1" and ".venv/" in env["excludes"]
    job = _yaml("kuberay/rayjob.yaml")["spec"]
    assert yaml.safe_load(job["runtimeEnvYAML"]) == env
    entry = shlex.split(job["entrypoint"])
    assert entry[0] == "python"
    script = entry[1].removeprefix("/home/ray/hericap/")  # WORKDIR of the Dockerfile
    assert (REPO / script).is_file(), script

    serve_config = yaml.safe_load(_yaml("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["runtime_env"] == env
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert set(app["args"]) <= set(DEFAULTS) and app["args"]["checkpoint"]
    for line in (CLUSTER / "aws.yaml").read_text().splitlines():
        for path in re.findall(r"python (jobs/\S+\.py)", line):
            assert (REPO / path).is_file(), path


def _documented_command(name: str) -> list[str]:
    """The training command a config's header comment shows (continuation lines joined), from
    its script on."""
    lines = []
    for line in (CLUSTER / name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines).replace("\\ ", " ")
    words = shlex.split(text[text.index("python jobs/train_caption.py") :])
    end = next((i for i, w in enumerate(words) if w.startswith("#") or w == "The"), len(words))
    return words[1:end]


def test_every_config_trains_one_command_with_every_location_in_s3():
    """The RayJob's entrypoint is the command the RayCluster and AWS configs document (the
    multi-node test runs it on a real multi-node cluster); on a multi-node cluster every location
    it names is a URI (a local path would be refused), and the RayService serves what it keeps."""
    entry = shlex.split(_yaml("kuberay/rayjob.yaml")["spec"]["entrypoint"])
    job_args = entry[2:]
    for name in ("kuberay/raycluster.yaml", "aws.yaml"):
        script, *args = _documented_command(name)
        assert script == "jobs/train_caption.py" and args == job_args, name
    cfg = load_config(job_args)
    for key in ("dataset.shard_dir", "exp.storage_path", "exp.output_dir"):
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field).startswith("s3://BUCKET/"), key
    serve_config = yaml.safe_load(_yaml("kuberay/rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["args"]["checkpoint"] == f"{cfg.exp.storage_path}/best"
    assert app["args"]["num_gpus"] >= 1
