"""GPUs wherever a GPU helps: the CUDA RNG in exact-resume state, captioning on CUDA (bf16 where
supported), batch-evaluation actors and Serve replicas that ask for a GPU and decode there, and
a GPU training run stopped and resumed. Marked ``gpu``: they skip, with the reason, where no
CUDA device is present (``benchmarks/gpu_check.sh`` runs them, then the GPU benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import torch
from helpers import free_port, jpeg
from tiny_model import TINY_MODEL

from hericap.checkpoint import load_checkpoint, save_checkpoint
from hericap.config import load_config
from hericap.data.text import Vocabulary
from hericap.models.builder import build_captioner

pytestmark = pytest.mark.gpu

TINY = ["preset=demo", *TINY_MODEL, "dataset.vocab_min_count=1"]


def _checkpoint(folder: Path, vocab: Vocabulary) -> str:
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    return save_checkpoint(folder / "ckpt", model, cfg, vocab, meta={"epoch": 0})


def test_the_rng_state_carries_cuda_and_restores_it():
    from hericap.training.rng import get_rng_state, set_rng_state

    torch.randn(1, device="cuda")  # CUDA in use
    state = get_rng_state()
    assert "cuda" in state and len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(8, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(8, device="cuda"), first)


def test_captioning_picks_cuda_and_gives_the_cpu_captions(tiny_shards, tmp_path, capsys):
    from skimage import data

    from hericap.cli import main
    from hericap.serve.images import ImageLimits, open_upload
    from hericap.serve.service import CaptionService

    ckpt = _checkpoint(tmp_path, Vocabulary.load(tiny_shards.vocab_path))
    image = open_upload(jpeg(data.astronaut()), ImageLimits())
    service = CaptionService(ckpt, beam_size=3, n_best=2)  # auto: bf16 where supported
    assert service.torch_device.type == "cuda"
    assert next(service.loaded.model.parameters()).is_cuda
    (result,) = service.caption([image])
    assert isinstance(result["caption"], str) and len(result["beams"]) == 2
    cpu = CaptionService(ckpt, beam_size=3, n_best=1, device="cpu")
    assert cpu.torch_device.type == "cpu" and isinstance(cpu.caption([image])[0]["caption"], str)
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(jpeg(data.astronaut()))
    assert main(["caption", str(photo), "--checkpoint", ckpt]) == 0
    assert "captioning on cuda" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.java
def test_batch_evaluation_actors_decode_on_the_gpu(ray_cluster, tiny_shards, tmp_path):
    from hericap.runtime.batch_eval import evaluate_checkpoint

    ckpt = _checkpoint(tmp_path, Vocabulary.load(tiny_shards.vocab_path))
    cfg = load_config(
        [
            *TINY,
            f"dataset.shard_dir={tiny_shards.root}",
            f"exp.output_dir={tmp_path}",
            "exp.ngpus_per_node=1",
            "exp.world_size=1",
            "decode.test_beam_size=2",
            "decode.max_len=6",
        ]
    )
    report = evaluate_checkpoint(cfg, ckpt, "test")
    assert report["decode"]["devices"] == ["cuda"] and report["num_images"] == 32


@pytest.mark.ray
def test_a_serve_replica_with_a_gpu_decodes_there(ray_cluster, tiny_shards, tmp_path):
    from skimage import data

    from hericap.serve.server import start, stop

    ckpt = _checkpoint(tmp_path, Vocabulary.load(tiny_shards.vocab_path))
    url = start({"checkpoint": ckpt, "num_gpus": 1, "num_cpus": 0.5}, port=free_port())
    try:
        assert requests.get(f"{url}/healthz", timeout=120).json()["device"].startswith("cuda")
        r = requests.post(
            f"{url}/caption",
            data=jpeg(data.astronaut()),
            headers={"Content-Type": "image/jpeg"},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["caption"]
    finally:
        stop()


@pytest.mark.ray
def test_a_gpu_run_stops_and_resumes_with_its_cuda_rng(ray_cluster, tiny_shards, tmp_path):
    from hericap.training.driver import train

    def run(*extra: str):
        return train(
            load_config(
                [
                    *TINY,
                    "exp.name=gpu",
                    f"exp.output_dir={tmp_path}",
                    f"dataset.shard_dir={tiny_shards.root}",
                    "dataset.synthetic_train=256",
                    "dataset.synthetic_val=32",
                    "dataset.synthetic_test=32",
                    "dataset.synthetic_seed=7",
                    "exp.ngpus_per_node=1",
                    "exp.world_size=1",
                    "exp.deterministic=True",
                    "optimizer.batch_size=8",
                    "optimizer.finetune_xe_epochs=2",
                    "optimizer.finetune_sc_epochs=0",
                    *extra,
                ]
            )
        )

    first = run("exp.steps_per_run=40")
    state = load_checkpoint(first.latest_checkpoint).training_state()
    assert state["step"] == 40 and "cuda" in state["rng"][0]
    resumed = run("exp.resume=True")
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[1]["step"] == 64 and resumed.history[1]["attempt"] == 2
    meta = json.loads((Path(resumed.latest_checkpoint) / "meta.json").read_text())
    assert meta["epoch"] == 1
