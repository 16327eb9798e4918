"""Locations (local paths and URIs, S3 through a moto server on 127.0.0.1): one API, never a URI
through ``Path``; folders replaced atomically; checkpoints that load from a folder or an S3
prefix and read nothing outside it; every dataset prepared into S3."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from tiny_model import TINY_MODEL

from hericap.checkpoint import load_checkpoint, save_checkpoint
from hericap.config import load_config
from hericap.data import storage
from hericap.data.text import Vocabulary
from hericap.models import build_captioner


def test_paths_and_uris_share_one_api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_uri("s3://b/k") and storage.is_uri("file:///mnt/x")
    assert not storage.is_uri("runs/x") and not storage.is_uri("C:/x")
    assert storage.join("s3://b/runs/", "best", "model.pt") == "s3://b/runs/best/model.pt"
    assert storage.basename("s3://b/runs/best/") == "best"
    assert storage.parent("s3://b/runs/best") == "s3://b/runs"
    assert storage.resolve("runs") == str(tmp_path / "runs")  # absolute: workers elsewhere
    assert storage.resolve("s3://b/runs") == "s3://b/runs"
    fs, path = storage.filesystem("file://" + str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)
    # what `Path("s3://b/k")` leaves, or a URI without its slashes, is refused with the fix
    for broken in ("s3:/bucket/syn", "s3:bucket/syn"):
        with pytest.raises(ValueError, match=r"s3://bucket/syn"):
            storage.check_location(broken, "--out")
    storage.write_text(storage.join(tmp_path, "a", "b.txt"), "x")
    assert storage.listdir(tmp_path / "a") == ["b.txt"] and storage.is_dir(tmp_path / "a")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder, or a prefix of a fresh bucket on the moto server."""
    if request.param == "local":
        return str(tmp_path / "store")
    import boto3

    url = request.getfixturevalue("moto_server")
    bucket = f"replace-{abs(hash(tmp_path.name)) % 10**8}"
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/runs"


def _folder(tmp_path: Path, name: str, version: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    for f in ("model.pt", "config.json", "meta.json"):
        (d / f).write_text(f"{version} {f}")
    return d


def _read(location: str) -> dict[str, str]:
    return {f: storage.read_text(storage.join(location, f)) for f in storage.listdir(location)}


def test_a_folder_is_replaced_only_once_its_new_copy_is_complete(root, tmp_path, monkeypatch):
    best = storage.join(root, "best")
    storage.replace_tree(_folder(tmp_path, "v1", "v1"), best)
    assert _read(best)["model.pt"] == "v1 model.pt"

    # the copy of v2 dies half way (a full disk, a lost connection): v1 is untouched
    real_copy = pafs.copy_files

    def copy_then_fail(source, destination, **kwargs):
        real_copy(source, destination, **kwargs)
        raise OSError("connection reset")

    monkeypatch.setattr(storage.pafs, "copy_files", copy_then_fail)
    with pytest.raises(OSError):
        storage.replace_tree(_folder(tmp_path, "v2", "v2"), best)
    monkeypatch.undo()
    assert set(_read(best).values()) == {"v1 model.pt", "v1 config.json", "v1 meta.json"}
    storage.recover_tree(best)  # the incomplete copy is dropped, v1 stays
    assert not storage.exists(best + ".incoming") and _read(best)["meta.json"] == "v1 meta.json"

    # the process dies after the new copy is complete, before it takes the name: the next run
    # finishes the swap
    monkeypatch.setattr(storage, "_swap_in", lambda *args: (_ for _ in ()).throw(OSError()))
    with pytest.raises(OSError):
        storage.replace_tree(_folder(tmp_path, "v3", "v3"), best)
    monkeypatch.undo()
    assert _read(best)["model.pt"] == "v1 model.pt"  # the old one is still whole
    storage.recover_tree(best)
    assert set(_read(best).values()) == {"v3 model.pt", "v3 config.json", "v3 meta.json"}
    assert not storage.exists(best + ".incoming") and not storage.exists(best + ".replacing")


def _tiny_checkpoint_config(*extra: str):
    return load_config(["preset=demo", *TINY_MODEL, *extra])


def test_a_checkpoint_loads_from_s3_without_the_weight_files_its_config_names(
    moto_server, tmp_path
):
    """The config records where the backbone and detector weights came from; loading reads
    only the checkpoint's own files (on another machine those paths do not exist)."""
    import boto3

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="ckpts")
    cfg = _tiny_checkpoint_config(
        "model.extractor.checkpoint=/weights/swin.pth",
        "model.detector.checkpoint=/weights/region_ckpt.pth",
        "model.use_reg_feat=True",
        "model.detector.num_levels=2",
        "model.detector.d_model=32",
        "model.detector.num_heads=2",
    )
    vocab = Vocabulary(["a", "red", "square"], min_count=1)
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab), 64, load_pretrained=False)
    with pytest.raises(FileNotFoundError):  # what the builder would read: not there
        build_captioner(cfg.model, len(vocab), 64)
    location = save_checkpoint("s3://ckpts/runs/best", model, cfg, vocab, meta={"epoch": 2})
    assert location == "s3://ckpts/runs/best"
    loaded = load_checkpoint(location)
    assert loaded.config.model.detector.checkpoint == "/weights/region_ckpt.pth"
    assert loaded.meta == {"epoch": 2} and loaded.path == location
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.training_state() is None
    with pytest.raises(FileNotFoundError, match="not a HeriCap checkpoint"):
        load_checkpoint("s3://ckpts/runs/nothing")


def test_prepare_synthetic_writes_to_s3_not_a_local_folder_named_s3(
    moto_server, tmp_path, monkeypatch, capsys
):
    import boto3

    from hericap.cli import main

    monkeypatch.chdir(tmp_path)
    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="syn")
    argv = ["prepare", "synthetic", "--out", "s3://syn/tiny", "--num-train", "16"]
    assert main([*argv, "--num-val", "4", "--num-test", "4", "--min-count", "1"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["out"] == "s3://syn/tiny"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="syn")["Contents"]}
    assert {"tiny/manifest.json", "tiny/vocab.json", "tiny/train-00000.parquet"} <= keys
    assert not (tmp_path / "s3:").exists()
    # a local dataset is not overwritten by the synthetic one
    from hericap.data.shards import Manifest

    Manifest(str(tmp_path / "mine"), "flickr8k", [], {}, None, {}).write()
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "mine")]) == 2
