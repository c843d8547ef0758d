"""Weighted k-NN against a per-sample brute force, attention maps, masks and the figure."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdino import models
from fastdino.eval import (extract_features, knn_classify, last_attention_maps, patch_pca_rgb,
                           save_attention_figure, threshold_attention)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def normalized(n: int, dim: int = 16) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim), dim=1)


def brute_force_knn(train_features, train_labels, test_features, test_labels, k, temperature, num_classes):
    """One test sample at a time: sort the training set by similarity, vote, rank the classes."""
    top1 = top5 = 0
    for feature, target in zip(test_features, test_labels.tolist()):
        similarities = (train_features * feature).sum(dim=1).tolist()
        nearest = sorted(zip(similarities, train_labels.tolist()), reverse=True)[:k]
        votes = [0.0] * num_classes
        for similarity, label in nearest:
            votes[label] += math.exp(similarity / temperature)
        ranking = [c for c in sorted(range(num_classes), key=lambda c: -votes[c]) if votes[c] > 0]
        top1 += ranking[0] == target
        top5 += target in ranking[:min(5, k)]
    n = len(test_labels)
    return 100.0 * top1 / n, 100.0 * top5 / n


@pytest.mark.parametrize("k", [1, 5, 20, 200])  # 200 > the 120 training samples: clipped
def test_knn_matches_brute_force(k):
    train_features, test_features = normalized(120), normalized(45)
    train_labels, test_labels = torch.randint(0, 10, (120,)), torch.randint(0, 10, (45,))
    result = knn_classify(train_features, train_labels, test_features, test_labels, k=k, temperature=0.07,
                          num_classes=10, chunk_size=7)
    top1, top5 = brute_force_knn(train_features, train_labels, test_features, test_labels, min(k, 120), 0.07, 10)
    assert result["top1"] == pytest.approx(top1) and result["top5"] == pytest.approx(top5)


def test_knn_several_ks_in_one_pass():
    train_features, test_features = normalized(80), normalized(30)
    train_labels, test_labels = torch.randint(0, 6, (80,)), torch.randint(0, 6, (30,))
    ks = (1, 10, 20, 500)
    results = knn_classify(train_features, train_labels, test_features, test_labels, ks=ks)
    assert set(results) == set(ks)
    for k in ks:
        assert results[k] == knn_classify(train_features, train_labels, test_features, test_labels, k=k)
    assert results[500] == knn_classify(train_features, train_labels, test_features, test_labels, k=80)


def test_knn_separable_clusters_are_perfect():
    centers = torch.eye(16)[:8] * 5
    train_labels, test_labels = torch.arange(8).repeat(10), torch.arange(8).repeat(4)
    train_features = F.normalize(centers[train_labels] + torch.randn(80, 16) * 0.3, dim=1)
    test_features = F.normalize(centers[test_labels] + torch.randn(32, 16) * 0.3, dim=1)
    result = knn_classify(train_features, train_labels, test_features, test_labels, k=20)
    assert result == {"top1": 100.0, "top5": 100.0}


def test_knn_without_five_classes_reports_top1_only():
    labels = torch.randint(0, 3, (20,))
    result = knn_classify(normalized(20), labels, normalized(10), torch.randint(0, 3, (10,)), k=5)
    assert set(result) == {"top1"}


def tiny_vit(patch_size: int = 8) -> models.VisionTransformer:
    return models.vit_tiny(patch_size=patch_size, img_size=[32], embed_dim=32, depth=2, num_heads=4)


def test_extract_features_normalised_and_restores_mode():
    model = tiny_vit().train()
    batches = [(torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])), (torch.randn(2, 3, 32, 32), [3, 4])]
    features, labels = extract_features(model, batches, "cpu")
    assert features.shape == (5, 32) and features.dtype == torch.float32
    torch.testing.assert_close(features.norm(dim=1), torch.ones(5))
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 2, 3, 4]
    assert model.training
    with torch.no_grad():
        expected = F.normalize(model.eval()(batches[0][0]), dim=1)
    torch.testing.assert_close(features[:3], expected)


def test_last_attention_maps_crop_and_match_the_model():
    model = tiny_vit().eval()
    image = torch.randn(3, 37, 50)  # cropped to 32 x 48: a 4 x 6 patch grid
    maps = last_attention_maps(model, image, patch_size=8)
    assert maps.shape == (4, 4, 6)
    with torch.no_grad():
        attn = model.get_last_selfattention(image[None, :, :32, :48])
    torch.testing.assert_close(maps, attn[0, :, 0, 1:].reshape(4, 4, 6))
    assert (maps > 0).all() and (maps.sum(dim=(1, 2)) < 1).all()


@pytest.mark.parametrize("keep_mass", [0.6, 0.9])
def test_threshold_keeps_the_mass_with_the_fewest_patches(keep_mass):
    maps = torch.rand(5, 6, 7) ** 3
    masks = threshold_attention(maps, keep_mass=keep_mass)
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    for head_map, mask in zip(maps, masks):
        share = head_map / head_map.sum()
        kept = share[mask]
        assert kept.sum() >= keep_mass - 1e-6
        assert kept.sum() - kept.min() < keep_mass  # dropping its weakest patch falls short
        assert share[~mask].max() <= kept.min()  # the strongest patches are the ones kept


def test_patch_pca_rgb_range_and_shape():
    rgb = patch_pca_rgb(tiny_vit(), torch.randn(3, 40, 56), patch_size=8)
    assert rgb.shape == (5, 7, 3)
    assert rgb.min() >= 0 and rgb.max() <= 1
    torch.testing.assert_close(rgb.flatten(0, 1).amin(0), torch.zeros(3))
    torch.testing.assert_close(rgb.flatten(0, 1).amax(0), torch.ones(3))


@pytest.mark.parametrize("with_extras", [False, True])
def test_save_attention_figure_writes_a_png(tmp_path, with_extras):
    model = tiny_vit()
    image = torch.randn(3, 32, 48)
    maps = last_attention_maps(model, image, patch_size=8)
    masks = threshold_attention(maps)
    image_uint8 = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    extras = dict(title="tiny ViT", pca_rgb=patch_pca_rgb(model, image, 8)) if with_extras else {}
    path = save_attention_figure(image_uint8, maps.numpy(), masks, tmp_path / "figs" / "attention.png", **extras)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
