"""`fastdino export --format hf` against the real transformers package (CPU), and Hugging Face ViT
folders read wherever a checkpoint is read.

Tolerances, fp32 on CPU, ViT-S/16 (12 blocks, perturbed weights, features of magnitude ~5):
  * native size (224 px): transformers' `ViTModel` gives fastdino's CLS and patch tokens to within
    1e-5 absolute (measured: bit-identical);
  * another size with `interpolate_pos_encoding=True`: within 5e-3 relative (L2 over the CLS
    tokens; measured 1.8e-3 at 160 px, 1.6e-3 at 160 x 224, 7.5e-4 at 288 px). The whole difference is
    the position-embedding resampling: transformers resizes to the target grid (`size=`), fastdino
    follows the official DINO (`scale_factor=(grid + 0.1) / side`), whose sampling points sit a
    little apart; with transformers' resampling put into fastdino, the outputs agree within 1e-5.
"""
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from fastdino import models
from fastdino.cli import main
from fastdino.eval.export import export_weights, read_backbone
from fastdino.train.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit_small(tmp_path_factory):
    """(fastdino ViT-S/16 with perturbed weights, its official .pth file, its hf export folder)."""
    return perturbed_and_exported(models.vit_small(patch_size=16), tmp_path_factory.mktemp("hf"), "dino_vits16")


@pytest.fixture(scope="module")
def vit_tiny(tmp_path_factory):
    """The same for a 2-block 32-px vit_tiny/8, where the test is about reading, not numbers."""
    return perturbed_and_exported(models.vit_tiny(patch_size=8, depth=2, img_size=[32]),
                                  tmp_path_factory.mktemp("hf_tiny"), "hf")


def perturbed_and_exported(model, root, name):
    """(`model` with its weights moved off their init values, its official .pth, its hf export folder `name`)."""
    torch.manual_seed(0)
    model = model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    torch.save(model.state_dict(), root / "official.pth")
    export_weights(root / "official.pth", root / name, "hf")
    return model, root / "official.pth", root / name


@pytest.fixture(scope="module")
def hf_model(vit_small):
    model, info = transformers.ViTModel.from_pretrained(vit_small[2], add_pooling_layer=False,
                                                        output_loading_info=True)
    return model.eval(), info


def images(height, width, n=2):
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(1))


def test_vit_model_loads_every_weight_and_nothing_is_left_random(hf_model, vit_small):
    _, info = hf_model
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    # The pooler is DINO's to leave out: with the default add_pooling_layer=True it is the only thing missing.
    _, info = transformers.ViTModel.from_pretrained(vit_small[2], output_loading_info=True)
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}


def test_config_json_is_complete(hf_model, vit_small, tmp_path):
    """Every field transformers itself writes, with the same values."""
    ours = json.loads((vit_small[2] / "config.json").read_text())
    hf_model[0].config.save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "config.json").read_text())
    theirs.pop("transformers_version")
    assert ours == theirs
    assert ours["layer_norm_eps"] == 1e-6 and ours["qkv_bias"] is True and ours["num_attention_heads"] == 6


@torch.no_grad()
def test_same_features_at_the_native_size(hf_model, vit_small):
    x = images(224, 224)
    ours, theirs = vit_small[0].forward_features(x), hf_model[0](x).last_hidden_state
    assert ours.shape == theirs.shape == (2, 197, 384)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def _hf_resampling(self, grid_h, grid_w):
    """transformers' ViTEmbeddings.interpolate_pos_encoding: bicubic to the target grid size."""
    side = math.isqrt(self.pos_embed.shape[1] - 1)
    if (grid_h, grid_w) == (side, side):
        return self.pos_embed
    grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return torch.cat((self.pos_embed[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)


@torch.no_grad()
@pytest.mark.parametrize("size", [(160, 160), (160, 224)])
def test_same_cls_features_at_another_size(hf_model, vit_small, size):
    model = vit_small[0]
    x = images(*size)
    theirs = hf_model[0](x, interpolate_pos_encoding=True).last_hidden_state
    ours = model.forward_features(x)
    relative = ((ours[:, 0] - theirs[:, 0]).norm() / ours[:, 0].norm()).item()
    assert relative < 5e-3, relative
    resampled = models.vit_small(patch_size=16).eval()
    resampled.load_state_dict(model.state_dict())
    resampled.interpolate_pos_encoding = types.MethodType(_hf_resampling, resampled)
    torch.testing.assert_close(theirs, resampled.forward_features(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_fastdino_reads_hf_folders_and_their_weight_files(vit_tiny, tmp_path):
    model, official, folder = vit_tiny
    x = images(32, 32)
    expected = model(x)
    # What export wrote; transformers' own save_pretrained of it (ViTModel, and a classifier with a
    # `vit.` prefix); the weight file on its own (our metadata carries the architecture).
    hf = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "saved")
    classifier = transformers.ViTForImageClassification.from_pretrained(folder, num_labels=5)
    classifier.save_pretrained(tmp_path / "classifier")
    # A transformers 5 state_dict() (its own module names) saved by hand as pytorch_model.bin.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for path in (folder, tmp_path / "saved", tmp_path / "classifier", folder / "model.safetensors", tmp_path / "bin"):
        backbone, weights = read_backbone(path)
        assert (weights.arch, weights.patch_size, weights.depth, weights.img_size) == ("vit_tiny", 8, 2, 32), path
        assert torch.equal(backbone(x), expected), path


@torch.no_grad()
def test_head_count_comes_from_the_config(tmp_path):
    """Anyone's ViT: 192 wide like vit_tiny but with 6 heads (vit_tiny has 3); not a shape the tensors show."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=6,
                                    intermediate_size=768, image_size=32, patch_size=8, layer_norm_eps=1e-6)
    theirs = transformers.ViTModel(config, add_pooling_layer=False).eval()
    theirs.save_pretrained(tmp_path)
    backbone, weights = read_backbone(tmp_path)
    assert weights.num_heads == 6 and backbone.num_heads == 6 and backbone.blocks[0].attn.num_heads == 6
    x = images(32, 32)
    torch.testing.assert_close(backbone.forward_features(x), theirs(x).last_hidden_state, atol=1e-5, rtol=0)
    export_weights(tmp_path, tmp_path.parent / "again.safetensors", "safetensors")
    assert read_backbone(tmp_path.parent / "again.safetensors")[0].num_heads == 6


def test_folders_fastdino_cannot_compute_are_one_line(vit_tiny, tmp_path, capsys):
    folder = vit_tiny[2]
    config = json.loads((folder / "config.json").read_text())
    without_eps = {k: v for k, v in config.items() if k != "layer_norm_eps"}  # then ViTConfig's default, 1e-12
    cases = [({**config, "layer_norm_eps": 1e-12}, r"layer_norm_eps is 1e-12, and fastdino's ViT computes with 1e-06"),
             (without_eps, "layer_norm_eps is 1e-12"),
             ({**config, "hidden_act": "gelu_new"}, "hidden_act is 'gelu_new'"),
             ({**config, "model_type": "dinov2"}, r"holds a Hugging Face 'dinov2' model")]
    for i, (edited, message) in enumerate(cases):
        case = tmp_path / f"case{i}"
        case.mkdir()
        (case / "config.json").write_text(json.dumps(edited))
        (case / "model.safetensors").symlink_to(folder / "model.safetensors")
        with pytest.raises(CheckpointError, match=message):
            read_backbone(case)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    assert main(["viz", "attention", str(tmp_path / "empty"), "x.png", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has a config.json but none of model.safetensors, pytorch_model.bin" in err


def test_cli_export_hf_and_read_it_back(vit_tiny, tmp_path, capsys):
    _, official, _ = vit_tiny
    assert main(["export", str(official), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}: hf layout, teacher vit_tiny/8, 30 tensors" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "hf"), "--format", "official", "--out", str(tmp_path / "back")]) == 0
    assert "reading" in capsys.readouterr().err  # a folder: the file it stood for
    back, original = (torch.load(path, weights_only=True) for path in (tmp_path / "back.pth", official))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
