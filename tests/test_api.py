"""The Python API: fastdino.train, fastdino.load_backbone, fastdino.extract_features."""
import subprocess
import sys

import pytest
import torch

import fastdino
from fastdino.api import _override_items
from fastdino.config import ConfigError, load_config
from fastdino.data import eval_loader
from fastdino.eval.export import export_weights
from fastdino.models.vit import VisionTransformer


def test_import_is_cheap_and_lazy():
    code = ("import sys, fastdino; heavy = ('torch', 'ffcv', 'deepspeed', 'omegaconf', 'transformers'); "
            "print(sorted(m for m in heavy if m in sys.modules)); print(sorted(fastdino.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "['extract_features', 'load_backbone', 'train']"]
    assert {"train", "load_backbone", "extract_features"} <= set(dir(fastdino))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fastdino.nothing


def test_train_is_callable_and_still_the_training_package():
    import fastdino.train.checkpoint

    assert callable(fastdino.train) and fastdino.train.checkpoint.CheckpointError


def test_overrides_keep_their_types():
    items = _override_items({"data": {"path": "a: b=c"}, "optim.lr": 1e-6, "seed": 3, "progress": False,
                             "data.augment.global_scale": (0.5, 1.0), "eval": {"knn_train_path": "null"}})
    cfg = load_config("demo", items)
    assert cfg.data.path == "a: b=c" and cfg.optim.lr == 1e-6 and cfg.seed == 3 and cfg.progress is False
    assert list(cfg.data.augment.global_scale) == [0.5, 1.0] and cfg.eval.knn_train_path == "null"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of the shipped demo config on synthetic crops, named by the config's bare name."""
    out = tmp_path_factory.mktemp("api") / "run"
    summary = fastdino.train("demo", max_steps=2, data={"path": "synthetic"}, output_dir=out, progress=False)
    return out, summary


def test_train_returns_the_summary(run):
    out, summary = run
    assert summary["steps"] == 2 and summary["output_dir"] == str(out)
    assert summary["last"]["step"] == 1 and summary["skipped_steps"] == []
    assert (out / "log.jsonl").is_file() and (out / "checkpoints" / "step_00000002.pt").is_file()


def test_train_with_dotted_keys_and_a_mapping(tmp_path):
    summary = fastdino.train({"model": {"arch": "vit_tiny", "depth": 1, "patch_size": 4, "img_size": 16},
                              "data.global_size": 16, "data.local_size": 8, "data.n_local_crops": 2},
                             **{"data.path": "synthetic", "data.batch_size": 4, "model.out_dim": 32,
                                "max_steps": 1, "output_dir": str(tmp_path), "progress": False})
    assert summary["steps"] == 1
    saved = (tmp_path / "config.yaml").read_text()
    assert "depth: 1" in saved and "out_dim: 32" in saved and "n_local_crops: 2" in saved
    with pytest.raises(ConfigError, match="config key 'model.nope' does not exist"):
        fastdino.train("demo", model={"nope": 1})


def test_load_backbone_reads_a_run_folder_and_exports(run, tmp_path):
    out, _ = run
    backbone = fastdino.load_backbone(out)
    assert isinstance(backbone, VisionTransformer) and not backbone.training
    assert (backbone.embed_dim, backbone.patch_embed.patch_size, len(backbone.blocks)) == (192, 8, 4)
    export_weights(out, tmp_path / "hf", "hf", which="student")
    student = fastdino.load_backbone(out, "student")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fastdino.load_backbone(tmp_path / "hf")(x), student(x))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    from fastdino import models

    return models.vit_tiny(patch_size=8, depth=2, img_size=[32])


def test_extract_features_shapes_and_values(backbone):
    x = torch.randn(5, 3, 32, 48)
    backbone.train()
    features = fastdino.extract_features(backbone, x, batch_size=2)
    assert backbone.training  # mode restored
    assert features["cls"].shape == (5, 192) and features["patch"].shape == (5, 4 * 6, 192)
    assert "labels" not in features and features["cls"].dtype == torch.float32
    with torch.no_grad():
        backbone.eval()
        torch.testing.assert_close(features["cls"], backbone(x))
        torch.testing.assert_close(features["patch"], backbone.get_intermediate_layers(x, 1)[0][:, 1:])
    only_cls = fastdino.extract_features(backbone, x, patch_tokens=False)
    assert set(only_cls) == {"cls"}


def test_extract_features_from_uint8_and_labelled_batches(backbone):
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    normalised = (pixels.float() / 255 - mean) / std
    batches = [(normalised[:2], torch.tensor([0, 1])), (normalised[2:], torch.tensor([2, 3]))]
    from_batches = fastdino.extract_features(backbone, batches)
    torch.testing.assert_close(fastdino.extract_features(backbone, pixels)["cls"], from_batches["cls"])
    assert from_batches["labels"].tolist() == [0, 1, 2, 3]


def test_extract_features_errors(backbone):
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        fastdino.extract_features(backbone, torch.zeros(2, 32, 32, 3))
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        fastdino.extract_features(backbone, torch.zeros(2, 3, 30, 32))
    mixed = [torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 32, 32)]
    with pytest.raises(ValueError, match="different numbers of patch tokens"):
        fastdino.extract_features(backbone, mixed)
    assert fastdino.extract_features(backbone, mixed, patch_tokens=False)["cls"].shape == (2, 192)
    with pytest.raises(ValueError, match="no images"):
        fastdino.extract_features(backbone, [])


def test_extract_features_from_an_eval_loader(backbone, digits_betons):
    train, _ = digits_betons
    features = fastdino.extract_features(backbone, eval_loader(str(train), 256, size=16))
    n = len(features["labels"])
    assert n > 1000 and features["cls"].shape == (n, 192) and features["patch"].shape == (n, 4, 192)
