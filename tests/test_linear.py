"""Linear probe: the recipe on separable synthetic features, feature extraction, defaults and the CLI."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from fastdino import models
from fastdino.cli import main
from fastdino.eval.linear import (evaluate_linear_probe, extract_probe_features, linear_probe, probe_defaults,
                                  train_linear_probe)


def separable_clusters(n_per_class: int, num_classes: int = 10, dim: int = 64, noise_seed: int = 0):
    """Tight Gaussian clusters around fixed random centres: a linear layer can classify them perfectly."""
    centres = 3.0 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    noise = torch.randn(len(labels), dim, generator=torch.Generator().manual_seed(noise_seed))
    return centres[labels] + 0.3 * noise, labels


def test_probe_separates_separable_data():
    train_features, train_labels = separable_clusters(40)
    val_features, val_labels = separable_clusters(10, noise_seed=1)
    untrained = linear_probe(train_features, train_labels, val_features, val_labels, epochs=1, lr=0.0)
    assert untrained["top1"] < 30  # the N(0, 0.01) init is at chance: what follows is learnt
    results = linear_probe(train_features, train_labels, val_features, val_labels, epochs=20, batch_size=128)
    assert results["top1"] == 100.0 and results["top5"] == 100.0 and results["train_top1"] == 100.0
    assert results["num_classes"] == 10 and results["feature_dim"] == 64


def test_official_init_and_determinism():
    features, labels = separable_clusters(5)
    untrained = train_linear_probe(features, labels, 10, epochs=1, lr=0.0)
    assert torch.all(untrained.bias == 0) and 0.008 < untrained.weight.std().item() < 0.012
    a = train_linear_probe(features, labels, 10, epochs=3, seed=3)
    b = train_linear_probe(features, labels, 10, epochs=3, seed=3)
    assert torch.equal(a.weight, b.weight)


def test_top5_needs_five_classes():
    features, labels = separable_clusters(5, num_classes=3)
    classifier = train_linear_probe(features, labels, 3, epochs=5)
    assert set(evaluate_linear_probe(classifier, features, labels)) == {"top1"}


def test_unlabelled_images_are_refused():
    features, labels = separable_clusters(3)
    with pytest.raises(ValueError, match="label -1"):
        linear_probe(features, torch.full_like(labels, -1), features, labels)


def test_features_are_cls_tokens_of_the_last_blocks_and_mean_patch():
    torch.manual_seed(0)
    backbone = models.vit_tiny(patch_size=4, img_size=[16], depth=3)
    images, labels = torch.randn(4, 3, 16, 16), torch.arange(4)
    features, out_labels = extract_probe_features(backbone, [(images, labels)], "cpu", n_last_blocks=2, avgpool=True)
    last_two = backbone.get_intermediate_layers(images, 2)
    assert features.shape == (4, 3 * 192) and torch.equal(out_labels, labels)
    assert torch.allclose(features[:, :192], last_two[0][:, 0]) and torch.allclose(features[:, 192:384], last_two[1][:, 0])
    assert torch.allclose(features[:, 384:], last_two[1][:, 1:].mean(dim=1))
    # forward() computes the last block at the class token alone: the same up to float rounding
    torch.testing.assert_close(extract_probe_features(backbone, [(images, labels)], "cpu", 1)[0], backbone(images),
                               atol=1e-5, rtol=1e-5)


def test_official_defaults_by_arch():
    assert probe_defaults("vit_small") == (4, False) and probe_defaults("vit_tiny") == (4, False)
    assert probe_defaults("vit_base") == (1, True)


def test_cli_linear_on_digits(tmp_path, digits_betons, capsys):
    from fastdino.config import load_config
    from fastdino.ssl import build_student_teacher
    from fastdino.train.checkpoint import save_checkpoint

    cfg = load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=4", "model.img_size=16",
                             "model.out_dim=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
                             "eval.eval_size=16", "data.path=unused"])
    nets = build_student_teacher(cfg.model)
    checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, {"student": nets.student.state_dict(),
                                 "teacher": nets.teacher.state_dict(), "config": OmegaConf.to_yaml(cfg)}, keep=1)
    train, val = digits_betons
    report = tmp_path / "linear.json"
    assert main(["eval", "linear", str(checkpoint), "--train", str(train), "--val", str(val), "--epochs", "3",
                 "--device", "cpu", "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    assert results["n_last_blocks"] == 1 and results["avgpool"] is False and results["feature_dim"] == 192
    assert 10 < results["top1"] <= 100 and results["num_classes"] == 10  # far above chance even untrained
    assert "teacher linear probe (1 block, 192-d): top-1" in capsys.readouterr().out


def test_help():
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "linear", "--help"])
    assert exit_info.value.code == 0
