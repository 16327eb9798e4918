"""Research checkpoints (GRIT, HierCap) into HeriCap: the importer, the research flavours' parity
with the research code's own outputs (the oracle in $HERICAP_REALDATA/research_checkpoints), the
command line, safe loading, and captions that do not depend on the batch in HeriCap's flavour."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from hericap.checkpoint import load_checkpoint
from hericap.checkpoint.research import import_research_checkpoint, plan_weights
from hericap.checkpoint.research_config import research_config
from hericap.cli import main as cli_main
from hericap.config import ConfigError, load_config
from hericap.data.text import Vocabulary, collapse_repeats
from hericap.data.transforms import resize_spec
from hericap.evaluation.research_parity import NOISE, ORACLE_MODELS
from hericap.models.builder import build_captioner
from hericap.models.research_keys import map_research_keys
from hericap.models.safe_load import load_tensor_file

REPO_ROOT = Path(__file__).resolve().parents[1]
# "within a few times the research code's own float32 noise" (oracle README, Tolerances)
NOISE_FACTOR = 4
DTYPES = {"float32": torch.float32, "int64": torch.int64, "uint8": torch.uint8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the oracle was made (and steadier on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle(realdata: Path) -> Path:
    return realdata / "research_checkpoints"


@pytest.fixture(scope="module")
def bench(oracle: Path) -> dict:
    """``benchmarks/bench_parity.py`` run once, in this process (it imports and compares all
    three models); its last line is the JSON report."""
    argv = sys.argv
    out = io.StringIO()
    try:
        sys.argv = ["bench_parity.py", "--threads", "1"]
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(REPO_ROOT / "benchmarks" / "bench_parity.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.mark.realdata
def test_bench_parity_prints_every_model_and_the_beam_share(bench):
    assert set(bench) >= {"max_abs_diff", "identical_beam_share", "caption_equal_share"}
    assert set(bench["max_abs_diff"]) == set(ORACLE_MODELS)
    assert bench["beams"] == 3 * (3 * (1 + 5 + 1 + 3) + 3)  # 4 searches of 3 images + 3 alone


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(ORACLE_MODELS))
def test_every_stage_equals_the_research_outputs(bench, name):
    diffs = bench["max_abs_diff"][name]
    assert "mismatched_beams" not in diffs, diffs.get("mismatched_beams")
    exact = [
        k for k in diffs if k.startswith("preprocess") or k.endswith("mask") or k == "det.masks"
    ]
    for key in exact:  # our transform, padding and every mask: identical
        assert diffs[key] == 0.0, key
    tf_noise = NOISE["tf.logprobs"] * NOISE_FACTOR
    for key, value in diffs.items():
        if key in exact:
            continue
        if key.endswith("logprobs"):
            limit = tf_noise
        else:
            stage = key.removeprefix("single.")
            limit = NOISE["det_module.hs" if stage == "det_module.hs" else stage] * NOISE_FACTOR
        assert value <= limit, (key, value, limit)
    needed = {"det.gri_feat", "det.reg_feat", "det_module.hs", "grid_net.out", "tf.logprobs"}
    if ORACLE_MODELS[name] == "hiercap":
        needed |= {"glob_net.out", "det.reg_point", "det.glo_feat"}
    assert needed <= set(diffs)


@pytest.mark.realdata
def test_beams_and_captions_come_out_token_for_token(bench):
    assert bench["identical_beam_share"] == 1.0
    assert bench["caption_equal_share"] == 1.0


# ---- the importer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hiercap_folder(oracle: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("import") / "hiercap_cp"
    name = "hiercap_concatenated_parallel"
    assert (
        cli_main(
            [
                "import",
                "hiercap",
                "--checkpoint",
                str(oracle / name / "checkpoint.pth"),
                "--config",
                str(oracle / name / "config.yaml"),
                "--vocab",
                str(oracle / "vocab.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


@pytest.mark.realdata
def test_import_writes_a_self_describing_folder(hiercap_folder, oracle):
    meta = json.loads((hiercap_folder / "meta.json").read_text())
    source = meta["imported_from"]
    manifest = json.loads((oracle / "MANIFEST.json").read_text())["files"]
    assert source["sha256"] == manifest["hiercap_concatenated_parallel/checkpoint.pth"]["sha256"]
    assert source["research_commit"] == "dd758e7a343b4c33d9043d1ac99dfbf9584c10d4"
    assert (hiercap_folder / "vocab.json").read_bytes() == (oracle / "vocab.json").read_bytes()
    loaded = load_checkpoint(hiercap_folder)  # everything from the folder alone
    cfg = loaded.config
    assert cfg.model.flavour == "hiercap" and cfg.dataset.resize == "maxwh"
    assert cfg.model.cap_generator.decoder_name == "Concatenated_Parallel"
    # the random (never trained) position table is loaded, not recomputed
    research = torch.load(
        oracle / "hiercap_concatenated_parallel/checkpoint.pth", weights_only=True
    )
    assert torch.equal(
        loaded.model.decoder.positions.weight,
        research["state_dict"]["cap_generator.pos_emb.weight"],
    )


@pytest.mark.realdata
def test_caption_json_reproduces_the_oracle_beams_from_the_command_line(
    hiercap_folder, oracle, capsys
):
    info = json.loads((oracle / "inputs.json").read_text())
    images = [str(oracle / image["path"]) for image in info["images"]]
    options = ["--checkpoint", str(hiercap_folder), "--beam-size", "5", "--n-best", "5", "--json"]
    code = cli_main(["caption", *images, *options])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    ref = torch.load(oracle / "hiercap_concatenated_parallel/outputs.pt", weights_only=True)
    captions = json.loads((oracle / "hiercap_concatenated_parallel/outputs.json").read_text())
    assert [x["image"] for x in lines] == images
    for i, line in enumerate(lines):
        assert [c["tokens"] for c in line["captions"]] == ref["beam.b5_o5.tokens"][i].tolist()
        got = torch.tensor([c["token_log_probs"] for c in line["captions"]])
        assert (got - ref["beam.b5_o5.logprobs"][i]).abs().max() < NOISE["tf.logprobs"] * 4
        decoded = [c["caption"] for c in line["captions"]]
        assert decoded == captions["captions"]["beam.b5_o5"]["decode"][i]
        assert line["collapse_repeats"] is False


@pytest.mark.realdata
def test_detector_checkpoint_import_gives_the_research_detector_and_says_what_is_fresh(
    oracle, moto_server
):
    """Imported straight into S3 (a moto server): the folder there, vocabulary file as given."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="imports")
    report = import_research_checkpoint(
        "grit",
        oracle / "grit_parallel/detector_checkpoint.pth",
        oracle / "grit_parallel/detector_config.yaml",
        oracle / "vocab.json",
        "s3://imports/det",
    )
    assert report.out == "s3://imports/det" and report.kind == "detector" and report.fresh
    vocab = s3.get_object(Bucket="imports", Key="det/vocab.json")["Body"].read()
    assert vocab == (oracle / "vocab.json").read_bytes()
    assert all(k.startswith(("grid_encoder.", "decoder.")) for k in report.fresh)
    assert "GRIT's unused detection-token expansion in the patch merging" in report.dropped.values()
    model = load_checkpoint("s3://imports/det").model
    inputs = torch.load(oracle / "inputs.pt", weights_only=True)
    ref = torch.load(oracle / "grit_parallel/outputs.pt", weights_only=True)
    with torch.no_grad():
        encoded = model.encode_all(inputs["batch"], inputs["resized_hw"], details=True)
    grid = encoded.details["maps"][-1].flatten(1, 2)
    assert (grid - ref["det.gri_feat"]).abs().max() < NOISE["det.gri_feat"] * NOISE_FACTOR
    reg = encoded.details["region"].features
    assert (reg - ref["det.reg_feat"]).abs().max() < NOISE["det.reg_feat"] * NOISE_FACTOR
    # the GRIT flavour trains every parameter it keeps (dead research weights were dropped)
    model.train()
    model(inputs["batch"][:2, :, :128, :192], inputs["tf_seq"][:2]).mean().backward()
    idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle, idle


@pytest.mark.realdata
@pytest.mark.parametrize(
    "variant",
    [
        "grit",
        "hiercap/Concatenated_Parallel",
        "hiercap/Parallel",
        "hiercap/Sequential",
        "hiercap/Concatenated_Sequential",
    ],
)
def test_every_paper_size_key_maps_with_its_shape_on_the_meta_device(oracle, variant):
    full = json.loads((oracle / "full_size_keys.json").read_text())[variant]
    repo, _, decoder = variant.partition("/")
    state = {
        k: torch.empty(shape, dtype=DTYPES[dtype], device="meta")
        for k, (shape, dtype) in full["state_dict"].items()
    }
    tree = yaml.safe_load(
        (
            oracle
            / f"{'grit_parallel' if repo == 'grit' else 'hiercap_sequential'}"
            / "config.yaml"
        ).read_text()
    )
    if decoder:
        tree["model"]["cap_generator"]["decoder_name"] = decoder
    cfg = research_config(repo, tree, state, vocab_size=10201)
    assert cfg.model.extractor.depths == [2, 2, 18, 2] and cfg.model.d_model == 512
    with torch.device("meta"):
        model = build_captioner(cfg.model, 10201, resize_spec(cfg.dataset).model_size)
    mapping = map_research_keys(state, repo, cfg.model.cap_generator.decoder_name, 4)
    assert not mapping.unknown
    assert set(mapping.mapped) | set(mapping.dropped) == set(state)  # every key accounted for
    ours, fresh = plan_weights(model.state_dict(), state, mapping, "caption")  # shapes checked
    assert not fresh and set(ours) == set(model.state_dict())
    # the parameters HeriCap leaves out are exactly the dropped dead weights
    buffers = ("relative_position_index", "running_keys", "running_values", "running_mask_x",
               "running_seq")  # fmt: skip
    dead = sum(state[k].numel() for k in mapping.dropped if not k.endswith(buffers))
    assert sum(p.numel() for p in model.parameters()) + dead == full["num_parameters"]


@pytest.mark.realdata
def test_unknown_or_missing_keys_are_errors_that_list_them(oracle):
    research = torch.load(oracle / "grit_parallel/checkpoint.pth", weights_only=True)
    state = dict(research["state_dict"])
    tree = yaml.safe_load((oracle / "grit_parallel/config.yaml").read_text())
    cfg = research_config("grit", tree, state, vocab_size=10201)
    model = build_captioner(cfg.model, 10201, resize_spec(cfg.dataset).model_size)
    del state["grid_net.fc.bias"]
    state["cap_generator.layers.0.surprise.weight"] = torch.zeros(2)
    mapping = map_research_keys(state, "grit", "Parallel", 4)
    with pytest.raises(RuntimeError) as e:
        plan_weights(model.state_dict(), state, mapping, "caption")
    assert "grid_encoder.proj.0.bias" in str(e.value)
    assert "cap_generator.layers.0.surprise.weight" in str(e.value)


# ---- safe loading ---------------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.realdata
def test_real_research_files_load_without_unpickling_code(oracle, tmp_path):
    research = torch.load(oracle / "grit_parallel/checkpoint.pth", weights_only=True)
    # what real files carry: numpy scalars in scores (checkpoint_best_valid.pth), and an
    # OmegaConf config in a detector checkpoint's args
    np = pytest.importorskip("numpy")
    research["scores"] = {"CIDEr": np.float64(1.31), "ROUGE": np.float64(0.58)}
    research["args"] = OmegaConf.create({"model": {"d_model": 512}, "exp": {"seed": 42}})
    path = tmp_path / "checkpoint_best_valid.pth"
    torch.save(research, path)
    report = import_research_checkpoint(
        "grit", path, oracle / "grit_parallel/config.yaml", oracle / "vocab.json", tmp_path / "o"
    )
    assert report.kind == "caption" and not report.fresh
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": _Boom()}, evil)
    with pytest.raises(ValueError, match="cannot be read safely"):
        load_tensor_file(evil.read_bytes(), "evil.pth")


# ---- vocabulary and the collapse option -----------------------------------------------------


@pytest.mark.realdata
def test_the_research_vocabulary_loads_and_decodes_as_it_is(oracle):
    vocab = Vocabulary.load(oracle / "vocab.json")
    itos = json.loads((oracle / "vocab.json").read_text())["itos"]
    assert vocab.itos == itos and len(vocab) == 10201
    spaces = [i for i, w in enumerate(itos) if not w.strip()]
    assert spaces  # " ", "\n" ... entries stay where they are
    assert vocab.decode([4, spaces[0], 5, 3, 9]) == f"a {itos[spaces[0]]} on"


def test_collapse_repeats_is_explicit_and_off_by_default():
    assert collapse_repeats(["a", "a", "dog", "a", "dog", "dog"]) == ["a", "dog", "a", "dog"]
    vocab = Vocabulary(["a", "dog"])
    ids = [vocab.stoi["a"], vocab.stoi["a"], vocab.stoi["dog"], vocab.eos_idx]
    assert vocab.decode(ids) == "a a dog"
    assert vocab.decode(ids, collapse_repeats=True) == "a dog"
    assert load_config([]).decode.collapse_repeats is False


# ---- flavours -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.flavour=research"], "known: ['hericap', 'grit', 'hiercap']"),
        (["model.flavour=grit", "model.use_glob_feat=True"], "GRIT's parallel layer"),
        (["model.embedding=research"], "position_table_size"),
        (["model.padding=sideways"], "known: ['by_size', 'research']"),
    ],
)
def test_flavour_options_are_validated_up_front(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(["preset=tiny", *overrides])


def test_hericap_captions_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    cfg = load_config(["preset=tiny", "dataset.resize=max_side", "dataset.min_size=64",
                       "dataset.max_size=96"])  # fmt: skip
    model = build_captioner(cfg.model, 40, (64, 96)).eval()
    sizes = [(64, 96), (96, 64), (64, 64), (48, 96), (80, 80)]
    x = torch.zeros(len(sizes), 3, 96, 96)
    for i, (h, w) in enumerate(sizes):
        x[i, :, :h, :w] = torch.randn(3, h, w)
    hw = torch.tensor(sizes)
    m = model.input_multiple
    with torch.no_grad():
        batch = model.generate(x, beam_size=3, max_len=8, n_best=3, image_hw=hw)
        padded = model.generate(x, beam_size=3, max_len=8, n_best=3)  # one padded pass
        worst_padded = 0.0
        for i, (h, w) in enumerate(sizes):
            own = (-(-h // m) * m, -(-w // m) * m)
            alone = model.generate(x[i : i + 1, :, : own[0], : own[1]], beam_size=3, max_len=8,
                                   n_best=3, image_hw=hw[i : i + 1])  # fmt: skip
            assert torch.equal(alone.tokens[0], batch.tokens[i])
            assert (alone.token_log_probs[0] - batch.token_log_probs[i]).abs().max() < 1e-5
            worst_padded = max(
                worst_padded, float((padded.log_probs[i] - alone.log_probs[0]).abs().max())
            )
    assert worst_padded > 1e-3  # the padded pass does depend on the batch: the test can fail
