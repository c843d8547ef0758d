"""Backbone export to the official / timm / safetensors / hf layouts and import from every supported file
(tests/test_hf.py: the Hugging Face side)."""
import argparse
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from fastdino.cli import main
from fastdino.config import load_config
from fastdino.eval.export import export_weights, load_pretrained_backbone, read_backbone, read_weights
from fastdino.eval.knn import knn_accuracy
from fastdino.ssl import build_student_teacher
from fastdino.train.checkpoint import SHARDED_PAYLOAD, CheckpointError, save_checkpoint

TINY_MODEL = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=4", "model.img_size=16", "model.out_dim=64",
              "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "eval.eval_size=16", "data.path=unused"]
TINY_SHAPE = dict(depth=1, img_size=16)  # what official/timm files do not record
# timm `vit_*_patch*` state_dict names with num_classes=0 (per block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2).
TIMM_BLOCK_KEYS = [f"blocks.0.{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                   for p in ("weight", "bias")]
TIMM_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
             *TIMM_BLOCK_KEYS}


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A fastdino training checkpoint at step 7 whose student and teacher differ."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY_MODEL)
    nets = build_student_teacher(cfg.model)
    with torch.no_grad():
        for param in nets.student.parameters():
            param.add_(0.05 * torch.randn_like(param))
    payload = {"student": nets.student.state_dict(), "teacher": nets.teacher.state_dict(), "dino_loss": {},
               "optimizer": {}, "config": OmegaConf.to_yaml(cfg)}
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoints", 7, payload, keep=1)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def reference(checkpoint, which="teacher"):
    return read_backbone(checkpoint, which)[0]


@pytest.mark.parametrize("fmt", ["official", "timm", "safetensors", "hf"])
def test_export_then_load_gives_identical_outputs(tmp_path, training_checkpoint, images, fmt):
    """Every export carries its architecture (a 1-block, 16-px vit_tiny/4): read back without flags."""
    summary = export_weights(training_checkpoint, tmp_path / "backbone", fmt)
    assert summary["source_step"] == 7 and summary["arch"] == "vit_tiny"
    out = Path(summary["out"])
    assert out.name == {"official": "backbone.pth", "hf": "backbone"}.get(fmt, "backbone.safetensors")
    loaded = load_pretrained_backbone(out)
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(training_checkpoint)(images))
        assert torch.equal(loaded.get_intermediate_layers(images, 1)[0],
                           reference(training_checkpoint).get_intermediate_layers(images, 1)[0])
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temporary file was renamed away


def test_official_and_timm_hold_timms_names_in_their_own_containers(tmp_path, training_checkpoint):
    export_weights(training_checkpoint, tmp_path / "official.pth", "official")
    export_weights(training_checkpoint, tmp_path / "timm.safetensors", "timm")
    official = torch.load(tmp_path / "official.pth", weights_only=True)
    timm = load_file(tmp_path / "timm.safetensors")
    assert set(official) == set(timm) == TIMM_KEYS == set(reference(training_checkpoint).state_dict())
    assert all(torch.equal(official[k], timm[k]) for k in official)
    with safe_open(tmp_path / "timm.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["timm_model"] == "vit_tiny_patch16_224"
    assert json.loads(metadata["timm_model_args"]) == dict(img_size=16, patch_size=4, embed_dim=192, depth=1,
                                                           num_heads=3, num_classes=0)


def test_output_names_follow_the_format(tmp_path, training_checkpoint, capsys):
    with pytest.raises(CheckpointError, match=r"a \.safetensors file, not a \.pth file; name it \S*t\.safetensors"):
        export_weights(training_checkpoint, tmp_path / "t.pth", "safetensors")
    with pytest.raises(CheckpointError, match=r"official writes a \.pth file, not a \.safetensors file"):
        export_weights(training_checkpoint, tmp_path / "t.safetensors", "official")
    with pytest.raises(CheckpointError, match=r"hf writes a folder"):
        export_weights(training_checkpoint, tmp_path / "t.pth", "hf")
    assert main(["export", str(training_checkpoint), "--format", "timm", "--out", str(tmp_path / "t.pth")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert not list(tmp_path.iterdir())
    # The format's other extension, and names that say nothing about the container, are kept.
    for name in ("teacher.v2", "t.pt"):
        assert export_weights(training_checkpoint, tmp_path / name, "official")["out"] == str(tmp_path / name)


@pytest.mark.parametrize("fmt, flags, name", [
    ("official", [], "teacher_backbone.pth"),
    ("official", ["--with-head", "--which", "student"], "student_backbone_with_head.pth"),
    ("timm", [], "teacher_backbone_timm.safetensors"),
    ("safetensors", [], "teacher_backbone.safetensors"),
    ("safetensors", ["--with-head"], "teacher_backbone_with_head.safetensors"),
])
def test_an_existing_folder_gets_the_file_inside_it(tmp_path, training_checkpoint, images, capsys, fmt, flags, name):
    """Not FOLDER.pth beside it; the name says what the file holds, and the command says where it is."""
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", str(training_checkpoint), "--format", fmt, "--out", str(folder), *flags]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {folder / name}: {fmt} layout")
    assert [p.name for p in tmp_path.iterdir()] == ["exports"]
    assert [p.name for p in folder.iterdir()] == [name]
    which = "student" if "student" in flags else "teacher"
    with torch.no_grad():
        assert torch.equal(load_pretrained_backbone(folder / name, which=which)(images),
                           reference(training_checkpoint, which)(images))


def test_hf_writes_an_existing_folder_itself(tmp_path, training_checkpoint, capsys):
    """hf's output is a folder: an empty one becomes the export, one holding anything else is refused."""
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main(["export", str(training_checkpoint), "--format", "hf", "--out", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {folder}: hf layout")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", str(training_checkpoint), "--format", "hf", "--out", str(tmp_path / "mine")]) == 1
    assert capsys.readouterr().err == f"fastdino: error: output {tmp_path / 'mine'} exists and is not an hf export: " \
                                      "give a new folder name\n"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("fmt", ["official", "timm", "safetensors", "hf"])
def test_exports_get_the_permissions_of_the_umask(tmp_path, training_checkpoint, fmt):
    """Not 0600 (what safetensors' own writer gives): an export is meant to be shared."""
    previous = os.umask(0o022)
    try:
        out = Path(export_weights(training_checkpoint, tmp_path / "b", fmt)["out"])
    finally:
        os.umask(previous)
    for path in [*out.iterdir()] if out.is_dir() else [out]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_hf_export_replaces_an_earlier_export_but_nothing_else(tmp_path, training_checkpoint):
    export_weights(training_checkpoint, tmp_path / "hf", "hf")
    export_weights(training_checkpoint, tmp_path / "hf", "hf", which="student")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="exists and is not an hf export"):
        export_weights(training_checkpoint, tmp_path / "mine", "hf")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    with pytest.raises(CheckpointError, match="no place for the DINO projection head"):
        export_weights(training_checkpoint, tmp_path / "hf2", "hf", with_head=True)


def test_student_export_holds_the_student(tmp_path, training_checkpoint, images):
    export_weights(training_checkpoint, tmp_path / "student.safetensors", "safetensors", which="student")
    loaded = load_pretrained_backbone(tmp_path / "student.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(training_checkpoint, "student")(images))
        assert not torch.equal(loaded(images), reference(training_checkpoint, "teacher")(images))


def test_deepspeed_step_folder_exports_like_a_step_file(tmp_path, training_checkpoint, images):
    """A DeepSpeed run checkpoints into a step folder whose fastdino.pt holds student and teacher."""
    folder = tmp_path / "checkpoints" / "step_00000007"
    folder.mkdir(parents=True)
    shutil.copy(training_checkpoint, folder / SHARDED_PAYLOAD)
    summary = export_weights(folder, tmp_path / "teacher.safetensors", "safetensors")
    assert summary["source_step"] == 7
    with torch.no_grad():
        assert torch.equal(load_pretrained_backbone(tmp_path / "teacher.safetensors")(images),
                           reference(training_checkpoint)(images))


def test_safetensors_metadata(tmp_path, training_checkpoint):
    out = tmp_path / "b.safetensors"
    export_weights(training_checkpoint, out, "safetensors")
    with safe_open(out, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["arch"] == "vit_tiny" and metadata["patch_size"] == "4" and metadata["embed_dim"] == "192"
    assert metadata["depth"] == "1" and metadata["img_size"] == "16" and metadata["source_step"] == "7"
    assert metadata["num_heads"] == "3" and metadata["format_version"] == "1" and metadata["which"] == "teacher"


def test_with_head_layouts(tmp_path, training_checkpoint):
    export_weights(training_checkpoint, tmp_path / "full.pth", "official", with_head=True)
    state = torch.load(tmp_path / "full.pth", weights_only=True)
    assert list(state) == ["teacher"]
    original = torch.load(training_checkpoint, weights_only=True)["teacher"]
    assert set(state["teacher"]) == set(original)  # backbone.* and head.*, as official full checkpoints
    assert any(k.startswith("head.last_layer") for k in state["teacher"])
    export_weights(training_checkpoint, tmp_path / "full.safetensors", "safetensors", with_head=True)
    weights = read_weights(tmp_path / "full.safetensors")
    assert set(weights.head) == {k.removeprefix("head.") for k in original if k.startswith("head.")}
    for path in (tmp_path / "full.pth", tmp_path / "full.safetensors"):
        load_pretrained_backbone(path, "vit_tiny", 4, **TINY_SHAPE)
    with pytest.raises(CheckpointError, match="timm has no place"):
        export_weights(training_checkpoint, tmp_path / "t", "timm", with_head=True)


def test_official_full_checkpoint_with_module_prefixes(tmp_path, training_checkpoint, images):
    """As main_dino.py saves it: DDP student (`module.backbone.*`), plain teacher, args as a Namespace."""
    state = torch.load(training_checkpoint, weights_only=True)
    official = {"student": {f"module.{k}": v for k, v in state["student"].items()}, "teacher": state["teacher"],
                "optimizer": {}, "epoch": 3, "args": argparse.Namespace(arch="vit_tiny", patch_size=4)}
    torch.save(official, tmp_path / "checkpoint.pth")
    for which in ("teacher", "student"):
        loaded = load_pretrained_backbone(tmp_path / "checkpoint.pth", "vit_tiny", 4, which=which, **TINY_SHAPE)
        with torch.no_grad():
            assert torch.equal(loaded(images), reference(training_checkpoint, which)(images))


def test_timm_file_with_a_classifier_and_a_state_dict_wrapper_loads(tmp_path, training_checkpoint, images):
    state = reference(training_checkpoint).state_dict()
    torch.save({"state_dict": {**state, "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}},
               tmp_path / "timm.pth")
    loaded = load_pretrained_backbone(tmp_path / "timm.pth", "vit_tiny", 4, **TINY_SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded(images), reference(training_checkpoint)(images))


def test_mismatched_weights_name_the_keys(tmp_path, training_checkpoint):
    export_weights(training_checkpoint, tmp_path / "official.pth", "official")
    with pytest.raises(CheckpointError, match=r"does not fit vit_small.*wrong shapes \[blocks\.0\.attn\.proj\.bias"):
        load_pretrained_backbone(tmp_path / "official.pth", "vit_small", 4, **TINY_SHAPE)
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\.attn"):
        load_pretrained_backbone(tmp_path / "official.pth", "vit_tiny", 4, depth=2, img_size=16)
    state = torch.load(tmp_path / "official.pth", weights_only=True)
    del state["blocks.0.mlp.fc1.weight"]
    state["blocks.0.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.0\.mlp\.fc1\.weight\]; "
                                              r"unexpected keys \[blocks\.0\.extra\]"):
        load_pretrained_backbone(tmp_path / "broken.pth", "vit_tiny", 4, **TINY_SHAPE)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)},
               tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"does not say which model.*\[conv1\.weight, fc\.weight\].*--arch"):
        load_pretrained_backbone(tmp_path / "resnet.pth")


def test_official_files_need_no_architecture_arguments(tmp_path, training_checkpoint, images):
    """Width, patch size, depth and image size of a 1-block 16-px vit_tiny/4 come from its tensor shapes."""
    export_weights(training_checkpoint, tmp_path / "official.pth", "official")
    weights = read_weights(tmp_path / "official.pth")
    assert (weights.arch, weights.patch_size, weights.depth, weights.img_size) == ("vit_tiny", 4, 1, 16)
    with torch.no_grad():
        assert torch.equal(load_pretrained_backbone(tmp_path / "official.pth")(images),
                           reference(training_checkpoint)(images))


def test_corrupted_and_missing_files_give_a_clear_error(tmp_path, training_checkpoint):
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 10)
    truncated = training_checkpoint.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(truncated[:len(truncated) // 2])
    export_weights(training_checkpoint, tmp_path / "ok.safetensors", "safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) - 100])
    for name in ("garbage.pth", "truncated.pt", "truncated.safetensors"):
        with pytest.raises(CheckpointError, match="cannot read"):
            load_pretrained_backbone(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_backbone(tmp_path / "absent.pth")


def test_cli_export_and_knn_on_exported_files(tmp_path, training_checkpoint, digits_betons, capsys):
    train, val = digits_betons
    out = tmp_path / "b.safetensors"
    assert main(["export", str(training_checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    assert "safetensors layout, teacher vit_tiny/4 of step 7" in capsys.readouterr().out
    export_weights(training_checkpoint, tmp_path / "official.pth", "official")
    # An architecture given on the command line wins over the tensor shapes, and must fit them.
    assert main(["eval", "knn", str(tmp_path / "official.pth"), "--train", str(train), "--val", str(val),
                 "--arch", "vit_small"]) == 1
    assert "wrong shapes" in capsys.readouterr().err
    report = tmp_path / "knn.json"
    assert main(["eval", "knn", str(out), "--train", str(train), "--val", str(val), "--k", "10",
                 "--drop-high-variance", "8", "--json", str(report), "--device", "cpu"]) == 0
    expected = knn_accuracy(read_backbone(out)[0], train, val, size=16, batch_size=128, device="cpu", ks=(10,),
                            drop_high_variance=8)[10]
    assert json.loads(report.read_text())["k=10"] == pytest.approx(expected)  # the flags reach the evaluation
    assert main(["export", str(tmp_path / "nothing.pt"), "--format", "official", "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line


def test_drop_high_variance_dimensions():
    from fastdino.eval.knn import drop_high_variance_dimensions

    train = torch.randn(50, 6)
    train[:, 2] *= 100  # the outlier dimension
    kept_train, kept_test = drop_high_variance_dimensions(train, train[:5], 1)
    assert kept_train.shape == (50, 5) and torch.allclose(kept_train.norm(dim=1), torch.ones(50))
    expected = torch.nn.functional.normalize(train[:, [0, 1, 3, 4, 5]], dim=1)
    assert torch.allclose(kept_train, expected) and torch.allclose(kept_test, expected[:5])


def test_help(capsys):
    for argv in (["export", "--help"], ["eval", "knn", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "--drop-high-variance" in capsys.readouterr().out


def test_head_saved_with_weight_norm_parametrizations_loads(tmp_path):
    from fastdino.eval.export import read_weights

    gain, direction = torch.rand(16, 1), torch.randn(16, 8)
    state = {"module.backbone.cls_token": torch.zeros(1, 1, 4),
             "module.head.last_layer.parametrizations.weight.original0": gain,
             "module.head.last_layer.parametrizations.weight.original1": direction}
    torch.save({"teacher": state}, tmp_path / "new_torch.pth")
    weights = read_weights(tmp_path / "new_torch.pth")
    assert torch.equal(weights.head["last_layer.weight_g"], gain)
    assert torch.equal(weights.head["last_layer.weight_v"], direction)
