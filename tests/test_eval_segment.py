"""`fastdino eval segment` and `fastdino eval attention-masks`, and the VOC / pairs reader they share.

Metrics are checked on hand-computed cases and against plain loops written here; the commands run
end to end through `fastdino.cli.main` on tiny folders written with PIL, with a random-init tiny
ViT saved as official weights.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdino import models
from fastdino.cli import main as cli
from fastdino.eval.attention_masks import jaccard, patch_grid_to_pixels
from fastdino.eval.segment import (confusion_matrix, few_shot_split, mean_iou, nearest_neighbours, transfer_labels,
                                   upsample_scores)
from fastdino.eval.segmentation_data import (VOC_CLASSES, open_segmentation_data, patch_label_distribution,
                                             patch_positions, read_mask, resize_to_patches)

NAN = float("nan")
# Stripe colours of the scenes below (class c is drawn in COLOURS[c]).
COLOURS = np.array([(20, 20, 20), (230, 40, 40), (40, 200, 60), (50, 80, 230)], dtype=np.uint8)


# ---------------------------------------------------------------- folders and weights

def stripes(order, height: int = 32, stripe: int = 8, noise_seed: int | None = None):
    """(image, labels): vertical stripes `stripe` px wide, stripe i of class order[i] and colour."""
    labels = np.repeat(np.asarray(order, dtype=np.uint8), stripe)[None, :].repeat(height, axis=0)
    image = COLOURS[labels]
    if noise_seed is not None:
        noise = np.random.default_rng(noise_seed).integers(-12, 13, image.shape)
        image = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
    return image, labels


def save_mask(labels: np.ndarray, path, mode: str = "P") -> None:
    mask = Image.fromarray(labels.astype(np.uint8), mode="L")
    if mode == "P":
        mask = mask.convert("P")
        mask.putpalette([v for c in range(256) for v in (c * 40 % 256, c * 80 % 256, c * 120 % 256)])
    mask.save(path)


def write_voc(root, scenes: dict, train, val, labels_txt=None):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for name, (image, labels) in scenes.items():
        Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        save_mask(labels, root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{n}\n" for n in train))
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in val))
    if labels_txt:
        (root / "labels.txt").write_text("\n".join(labels_txt) + "\n")
    return root


def write_pairs(root, scenes: dict, mask_mode: str = "L"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, (image, labels) in scenes.items():
        Image.fromarray(image).save(root / "images" / f"{name}.png")  # lossless: exact colours
        save_mask(labels, root / "masks" / f"{name}.png", mask_mode)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-init vit_tiny/8 (2 blocks, 32 px) saved as official backbone weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_vit_tiny8.pth"
    torch.save(models.vit_tiny(patch_size=8, depth=2, img_size=32).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A VOC folder of 6 stripe scenes of 32x40 (train a-c, val d-f) with 255 borders; f holds
    no foreground, and labels.txt names the 4 classes."""
    orders = {"a": [0, 1, 1, 2, 0], "b": [2, 0, 3, 3, 1], "c": [3, 1, 0, 2, 2],
              "d": [1, 2, 0, 3, 0], "e": [0, 0, 2, 1, 3], "f": [0, 0, 0, 0, 0]}
    scenes = {}
    for seed, (name, order) in enumerate(orders.items()):
        image, labels = stripes(order, noise_seed=seed)
        labels = labels.copy()
        labels[:, 7:9] = np.where(labels[:, 7:9] != labels[:, 6:7], 255, labels[:, 7:9])  # a VOC-like void band
        scenes[name] = (image, labels)
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    return write_voc(root, scenes, train=["a", "b", "c"], val=["d", "e", "f"],
                     labels_txt=["background", "red", "green", "blue"])


# ---------------------------------------------------------------- metrics

def plain_confusion(prediction, target, num_classes):
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, t in zip(np.ravel(prediction), np.ravel(target)):
        if t != 255:
            confusion[t, p] += 1
    return confusion


def plain_iou(confusion):
    ious = []
    for c in range(len(confusion)):
        tp = confusion[c, c]
        fp = sum(confusion[r, c] for r in range(len(confusion)) if r != c)
        fn = sum(confusion[c, r] for r in range(len(confusion)) if r != c)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    return ious


def test_mean_iou_hand_computed_with_an_absent_class():
    # 3 classes; class 2 is neither in the ground truth nor predicted: left out of the mean.
    target = torch.tensor([[0, 0, 1, 1], [0, 255, 1, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 0]])  # the 2 falls on an ignored pixel
    confusion = confusion_matrix(prediction, target, 3)
    assert confusion.tolist() == [[2, 1, 0], [1, 3, 0], [0, 0, 0]]
    scores = mean_iou(confusion.numpy())
    assert scores["iou"][0] == pytest.approx(2 / 4) and scores["iou"][1] == pytest.approx(3 / 5)
    assert np.isnan(scores["iou"][2]) and scores["classes"] == 2
    assert scores["miou"] == pytest.approx((2 / 4 + 3 / 5) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)


def test_mean_iou_counts_a_class_that_is_only_predicted():
    # Class 2 never in the ground truth but predicted once: IoU 0, and it does count.
    confusion = confusion_matrix(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), 3)
    scores = mean_iou(confusion.numpy())
    assert scores["iou"].tolist() == [0.5, 1.0, 0.0] and scores["miou"] == pytest.approx(0.5)


def test_all_ignore_image_adds_nothing():
    target = torch.full((4, 5), 255)
    confusion = confusion_matrix(torch.randint(0, 3, (4, 5)), target, 3)
    assert confusion.sum() == 0
    scores = mean_iou(confusion.numpy())
    assert np.isnan(scores["miou"]) and np.isnan(scores["pixel_accuracy"]) and scores["classes"] == 0


def test_confusion_and_iou_match_plain_loops():
    rng = np.random.default_rng(0)
    total = np.zeros((5, 5), dtype=np.int64)
    for _ in range(3):
        target = rng.integers(0, 4, (7, 9))  # class 4 never in the ground truth
        target[rng.random((7, 9)) < 0.2] = 255
        prediction = rng.integers(0, 5, (7, 9))
        confusion = confusion_matrix(torch.from_numpy(prediction), torch.from_numpy(target), 5).numpy()
        np.testing.assert_array_equal(confusion, plain_confusion(prediction, target, 5))
        total += confusion
    expected = plain_iou(total)
    scores = mean_iou(total)
    for got, want in zip(scores["iou"], expected):
        assert np.isnan(got) if want is None else got == pytest.approx(want)
    assert scores["miou"] == pytest.approx(np.mean([v for v in expected if v is not None]))


def test_confusion_rejects_a_label_outside_the_classes():
    with pytest.raises(ValueError, match="outside the 3 classes"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)


def plain_jaccard(prediction, target, valid):
    inter = union = 0
    for p, t, v in zip(np.ravel(prediction), np.ravel(target), np.ravel(valid)):
        if v:
            inter += bool(p and t)
            union += bool(p or t)
    return inter / union if union else 1.0


def test_jaccard_hand_computed_cases():
    target = np.array([[1, 1, 0], [0, 0, 0]], bool)
    assert jaccard(np.array([[1, 0, 0], [0, 0, 1]], bool), target) == pytest.approx(1 / 3)
    assert jaccard(target, target) == 1.0
    empty = np.zeros_like(target)
    assert jaccard(empty, empty) == 1.0  # both empty: they agree
    assert jaccard(target, empty) == 0.0 and jaccard(empty, target) == 0.0
    # Ignored pixels count for neither set: the stray prediction at (1, 2) is forgiven.
    valid = np.ones_like(target)
    valid[1, 2] = False
    assert jaccard(np.array([[1, 1, 0], [0, 0, 1]], bool), target, valid) == 1.0


def test_jaccard_per_head_matches_plain_loop():
    rng = np.random.default_rng(1)
    heads = rng.random((4, 6, 5)) < 0.4
    target, valid = rng.random((6, 5)) < 0.5, rng.random((6, 5)) < 0.8
    got = jaccard(heads, target, valid)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, [plain_jaccard(h, target, valid) for h in heads])


# ---------------------------------------------------------------- nearest neighbours and label transfer

def test_chunked_nearest_neighbours_match_brute_force():
    torch.manual_seed(0)
    queries, memory = F.normalize(torch.randn(37, 8), dim=1), F.normalize(torch.randn(101, 8), dim=1)
    want_sims, want_idx = (queries @ memory.T).topk(7, dim=1)
    for budget in (7, 64, 1000, 2**26):  # from one memory row chunk... to everything at once
        sims, idx = nearest_neighbours(queries, memory, 7, budget=budget)
        torch.testing.assert_close(sims, want_sims)
        assert torch.equal(idx, want_idx)
    with pytest.raises(ValueError, match="memory holds 101"):
        nearest_neighbours(queries, memory, 102)


def test_label_transfer_on_hand_made_features():
    # Memory: two patches near e0 labelled class 0 (one of them half class 2), one at e1 of class 1.
    memory = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    query = torch.tensor([[1.0, 0.0]])
    # k=1: the query is memory patch 0, so it takes its label.
    assert transfer_labels(query, memory, labels, k=1).tolist() == [[1.0, 0.0, 0.0]]
    # k=2: neighbours 0 (sim 1) and 1 (sim 0.8), weights exp(sim / T) normalised.
    w0, w1 = np.exp(1.0 / 0.1), np.exp(0.8 / 0.1)
    expected = (w0 * labels[0].numpy() + w1 * labels[1].numpy()) / (w0 + w1)
    np.testing.assert_allclose(transfer_labels(query, memory, labels, k=2, temperature=0.1)[0], expected, rtol=1e-5)
    # A large k is clipped to the memory; a high temperature tends to the plain average.
    flat = transfer_labels(query, memory, labels, k=50, temperature=1e6)[0]
    np.testing.assert_allclose(flat, labels.mean(dim=0), atol=1e-5)
    # The query between e0 and e1 (equally similar to patches 0 and 2) splits its vote evenly.
    middle = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    np.testing.assert_allclose(transfer_labels(middle, memory[[0, 2]], labels[[0, 2]], k=2)[0], [0.5, 0.5, 0.0],
                               atol=1e-6)


# ---------------------------------------------------------------- geometry between masks and patches

def test_resize_to_patches_cuts_less_than_a_patch():
    image = np.zeros((30, 45, 3), np.uint8)
    pixels, resized_hw = resize_to_patches(image, 40, 8)
    assert resized_hw == (40, 60) and pixels.shape == (40, 56, 3)
    pixels, resized_hw = resize_to_patches(np.zeros((32, 40, 3), np.uint8), 32, 8)
    assert resized_hw == (32, 40) and pixels.shape == (32, 40, 3)
    with pytest.raises(ValueError, match="smaller than the patch size"):
        resize_to_patches(image, 4, 8)


def test_patch_label_distribution_by_hand():
    mask = np.zeros((16, 16), np.uint8)
    mask[:8, 4:8] = 1  # patch 0: half class 1
    mask[:8, 8:] = 255  # patch 1: all ignore -> no label
    mask[8:, :8] = 2
    mask[8:12, :8] = 255  # patch 2: class 2 where labelled
    mask[8:, 8:] = 3
    mask[15, 15] = 1  # patch 3: 62 of 63 labelled pixels... one of them class 1, one ignored below
    mask[15, 14] = 255
    labels = patch_label_distribution(mask, (16, 16), 8, 4)
    np.testing.assert_allclose(labels, [[0.5, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 1 / 63, 0, 62 / 63]],
                               rtol=1e-6)
    # Shrunk by 2 (16 -> 8 px with patch 4): pixel centres map to the same 2x2 grid of patches.
    np.testing.assert_allclose(patch_label_distribution(mask, (8, 8), 4, 4), labels, rtol=1e-6)
    # Resized to 12 px, patch 8: one row and column of patches; the pixels of the cut strip count for nothing.
    cut = patch_label_distribution(mask, (12, 12), 8, 4)
    assert cut.shape == (1, 4)
    rows = np.floor(patch_positions(16, 12, 8)) < 1
    kept = mask[rows][:, rows]
    kept = kept[kept != 255]
    np.testing.assert_allclose(cut[0], np.bincount(kept, minlength=4) / kept.size, rtol=1e-6)


def test_upsampled_scores_keep_patch_values_and_borders():
    scores = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)  # [C=1, h=2, w=3]
    full = upsample_scores(scores, (16, 24), (16, 24), 8)[0]
    # Between the centres of patches 0 and 1 (pixels 4..11 of a row), a linear ramp; outside, the border value.
    assert full[0, :4].tolist() == [0.0] * 4 and full[0, 20:].tolist() == [2.0] * 4
    np.testing.assert_allclose(full[0, 4:12], np.linspace(0, 1, 17)[1::2], atol=1e-6)
    assert full[:4, 0].tolist() == [0.0] * 4 and full[12:, 0].tolist() == [3.0] * 4
    # A mask at twice the resized resolution: the patch-1 centre is pixel 23.5 of 48.
    double = upsample_scores(scores, (32, 48), (16, 24), 8)[0]
    assert double[0, 23].item() == pytest.approx(1 - 1 / 32) and double[0, 24].item() == pytest.approx(1 + 1 / 32)


def test_attention_masks_upsample_to_the_nearest_patch():
    grid = np.array([[[True, False], [False, True]]])
    full = patch_grid_to_pixels(grid, (20, 20), (20, 20), 8)  # 20 px cut to 16: the last 4 rows/cols
    assert full.shape == (1, 20, 20) and full.dtype == bool
    assert full[0, :8, :8].all() and not full[0, :8, 8:].any() and full[0, 8:, 8:].all()


# ---------------------------------------------------------------- the reader

def test_voc_reader_ids_classes_and_splits(voc):
    data = open_segmentation_data(voc)
    assert data.layout == "voc" and data.class_names == ("background", "red", "green", "blue")
    assert data.ids("train") == ["a", "b", "c"] and data.ids() == list("abcdef")
    image, mask = data.read("d")
    assert image.shape == (32, 40, 3) and image.dtype == np.uint8 and mask.shape == (32, 40)
    assert set(np.unique(mask)) <= {0, 1, 2, 3, 255}
    split_file = voc.parent / "mine.txt"
    split_file.write_text("e\nd\n")
    assert data.ids(str(split_file)) == ["e", "d"]
    with pytest.raises(FileNotFoundError, match="split 'test' not found"):
        data.ids("test")


def test_reader_defaults_to_voc_names_or_counts_pairs_classes(tmp_path):
    scene = stripes([0, 2, 1])
    voc = write_voc(tmp_path / "voc", {"x": scene}, ["x"], ["x"])
    assert open_segmentation_data(voc).class_names == VOC_CLASSES
    image, labels = stripes([0, 3])
    pairs = write_pairs(tmp_path / "pairs", {"x": scene, "y": (image, np.where(labels == 3, 5, labels))})
    assert open_segmentation_data(pairs).class_names == ("background", "class 1", "class 2", "class 3", "class 4",
                                                         "class 5")


def test_reader_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        open_segmentation_data(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="neither a Pascal VOC folder"):
        open_segmentation_data(tmp_path)

    pairs = write_pairs(tmp_path / "pairs", {"x": stripes([0, 1]), "y": stripes([1, 0])})
    Image.fromarray(stripes([1, 1])[0]).save(pairs / "images" / "z.jpg")
    with pytest.raises(FileNotFoundError, match=r"have no mask .*z\.jpg"):
        open_segmentation_data(pairs)
    save_mask(np.zeros((16, 16), np.uint8), pairs / "masks" / "z.png")  # the wrong size
    with pytest.raises(ValueError, match="is 16x16 but its image .* is 16x32"):
        open_segmentation_data(pairs).read("z")
    Image.fromarray(np.zeros((32, 16, 3), np.uint8)).save(pairs / "masks" / "z.png")
    with pytest.raises(ValueError, match="is a RGB image"):
        read_mask(pairs / "masks" / "z.png")

    voc = write_voc(tmp_path / "voc", {"x": stripes([0, 1])}, ["x"], ["x", "missing"], labels_txt=["bg", "thing"])
    data = open_segmentation_data(voc)
    with pytest.raises(ValueError, match="'missing'"):
        data.ids("val")
    save_mask(stripes([0, 2])[1], voc / "SegmentationClass" / "x.png")
    with pytest.raises(ValueError, match="has label 2 but .* names 2 classes"):
        data.read("x")


def test_few_shot_split(voc, tmp_path):
    data = open_segmentation_data(voc)
    assert few_shot_split(data, 2) == (["a", "b"], ["d", "e", "f"])
    assert few_shot_split(data, "all") == (["a", "b", "c"], ["d", "e", "f"])
    with pytest.raises(ValueError, match="--shots 4, but the train split"):
        few_shot_split(data, 4)
    pairs = open_segmentation_data(write_pairs(tmp_path / "p", {n: stripes([0, 1]) for n in "qrst"}))
    assert few_shot_split(pairs, 1) == (["q"], ["r", "s", "t"])
    (tmp_path / "p" / "train.txt").write_text("s\nt\n")
    assert few_shot_split(pairs, 1, "train") == (["s"], ["q", "r"])
    with pytest.raises(ValueError, match="--shots all needs a train split"):
        few_shot_split(pairs, "all")
    with pytest.raises(ValueError, match="no image is left"):
        few_shot_split(pairs, 4)


# ---------------------------------------------------------------- the commands

def run_cli(argv, capsys):
    code = cli(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_command_on_voc(weights, voc, tmp_path, capsys):
    out = tmp_path / "segment.json"
    code, printed, _ = run_cli(["eval", "segment", str(weights), "--data", str(voc), "--shots", "2", "--device", "cpu",
                                "--json", str(out)], capsys)
    assert code == 0
    assert printed.startswith("teacher 2-shot segmentation: mIoU ") and "(3 images)" in printed
    results = json.loads(out.read_text())
    assert 0 <= results["miou"] <= 100 and 0 <= results["pixel_accuracy"] <= 100
    assert list(results["per_class_iou"]) == ["background", "red", "green", "blue"]
    assert results["images"] == 3 and results["shots"] == 2 and results["k"] == 10 and results["temperature"] == 0.07
    assert results["memory_images"] == 2 and results["which"] == "teacher" and results["checkpoint"] == str(weights)
    assert results["classes_evaluated"] == 4 and results["size"] == 32
    assert (tmp_path / "segment.png").stat().st_size > 0  # the PNG goes next to the JSON

    png = tmp_path / "other.png"
    code, printed, _ = run_cli(["eval", "segment", str(weights), "--data", str(voc), "--shots", "all",
                                "--drop-high-variance", "8", "--max-images", "1", "--device", "cpu", "--png", str(png)],
                               capsys)
    assert code == 0 and "all-shot" in printed and "(1 images)" in printed and png.stat().st_size > 0


def test_segment_is_perfect_when_the_query_is_in_the_memory(weights, tmp_path, capsys):
    # Every query image is also a memory image and k = 1: each query patch finds itself, so the
    # prediction is its own patch labels; with stripes on the patch grid, that is every pixel.
    scenes = {f"s{i}": stripes(order, noise_seed=i) for i, order in
              enumerate([[0, 1, 2, 3, 1], [3, 3, 0, 2, 1], [2, 0, 1, 0, 3]])}
    pairs = write_pairs(tmp_path / "pairs", scenes, mask_mode="P")
    (pairs / "train.txt").write_text("s0\ns1\ns2\n")
    (pairs / "val.txt").write_text("s2\ns0\n")
    out = tmp_path / "perfect.json"
    code, printed, _ = run_cli(["eval", "segment", str(weights), "--data", str(pairs), "--shots", "all",
                                "--train-split", "train", "--val-split", "val", "--k", "1", "--device", "cpu",
                                "--json", str(out)], capsys)
    assert code == 0
    results = json.loads(out.read_text())
    assert results["miou"] == pytest.approx(100) and results["pixel_accuracy"] == pytest.approx(100)
    assert results["per_class_iou"] == {"background": 100, "class 1": 100, "class 2": 100, "class 3": 100}
    assert "mIoU 100.0% over 4 classes (2 images)" in printed


def test_segment_transfers_colours_to_new_scenes(weights, tmp_path, capsys):
    # Queries are new arrangements (and new noise) of the memory's colours, at the default k = 10: a
    # random ViT's patch tokens depend mostly on the colour they see, so nearest neighbours find the class.
    memory = {f"m{i}": stripes(order, noise_seed=i) for i, order in enumerate([[0, 1, 2, 3, 0], [3, 2, 1, 0, 2]])}
    queries = {f"q{i}": stripes(order, noise_seed=10 + i) for i, order in enumerate([[2, 2, 0, 1, 3], [1, 3, 3, 0, 2]])}
    pairs = write_pairs(tmp_path / "pairs", {**memory, **queries})
    out = tmp_path / "colours.json"
    code, _, _ = run_cli(["eval", "segment", str(weights), "--data", str(pairs), "--shots", "2", "--device", "cpu",
                          "--json", str(out)], capsys)
    assert code == 0
    results = json.loads(out.read_text())
    assert results["miou"] > 90 and results["pixel_accuracy"] > 90  # 100 % for torch seeds 0-4


def test_attention_masks_command(weights, voc, tmp_path, capsys):
    out = tmp_path / "attention.json"
    code, printed, _ = run_cli(["eval", "attention-masks", str(weights), "--data", str(voc), "--device", "cpu",
                                "--json", str(out)], capsys)
    assert code == 0
    results = json.loads(out.read_text())
    # vit_tiny has 3 heads; val image f has no foreground: skipped and counted.
    assert results["heads"] == 3 and len(results["jaccard_per_head"]) == 3
    assert results["images"] == 2 and results["skipped_empty_foreground"] == 1
    assert all(0 <= j <= 100 for j in results["jaccard_per_head"])
    assert results["best_head_jaccard"] == max(results["jaccard_per_head"])
    assert results["mean_over_heads"] == pytest.approx(np.mean(results["jaccard_per_head"]))
    assert results["jaccard_per_head"][results["best_head"]] == results["best_head_jaccard"]
    assert results["keep_mass"] == 0.6 and results["split"] == "val"
    assert printed.startswith(f"teacher attention masks: best head {results['best_head']} Jaccard ")
    assert "(2 images, 1 without foreground skipped)" in printed
    assert (tmp_path / "attention.png").stat().st_size > 0


def test_attention_masks_match_a_direct_computation(weights, tmp_path, capsys):
    # Pairs layout, every image; the command's per-head Jaccard equals thresholding the model's
    # attention here and comparing at full resolution (32x40 images: no resize, no cut).
    from fastdino.eval.attention_maps import last_attention_maps, threshold_attention
    from fastdino.eval.export import read_backbone
    from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

    scenes = {"u": stripes([0, 1, 1, 0, 0], noise_seed=3), "v": stripes([2, 0, 0, 0, 3], noise_seed=4)}
    pairs = write_pairs(tmp_path / "pairs", scenes)
    out = tmp_path / "a.json"
    code, _, _ = run_cli(["eval", "attention-masks", str(weights), "--data", str(pairs), "--keep-mass", "0.5",
                          "--device", "cpu", "--json", str(out)], capsys)
    assert code == 0
    backbone, _ = read_backbone(weights)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    per_image = []
    for image, labels in scenes.values():
        tensor = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
        masks = threshold_attention(last_attention_maps(backbone, tensor, 8), 0.5).numpy()
        full = masks.repeat(8, axis=1).repeat(8, axis=2)
        per_image.append([plain_jaccard(m, labels != 0, np.ones_like(m)) for m in full])
    np.testing.assert_allclose(json.loads(out.read_text())["jaccard_per_head"], 100 * np.mean(per_image, axis=0),
                               rtol=1e-6)


def test_commands_report_bad_input_in_one_line(weights, voc, tmp_path, capsys):
    for argv, message in [
        (["eval", "segment", str(weights), "--data", str(tmp_path / "none")], "data folder not found"),
        (["eval", "segment", str(weights), "--data", str(voc), "--shots", "9"], "--shots 9, but the train split"),
        (["eval", "segment", str(weights), "--data", str(voc), "--shots", "1", "--val-split", "test"],
         "split 'test' not found"),
        (["eval", "attention-masks", str(weights), "--data", str(tmp_path)], "neither a Pascal VOC folder"),
        (["eval", "attention-masks", str(weights), "--data", str(voc), "--keep-mass", "1.5"], "--keep-mass"),
    ]:
        code, _, err = run_cli(argv + ["--device", "cpu"], capsys)
        assert code == 1 and err.startswith("fastdino: error: ") and message in err and err.count("\n") == 1
    blank = write_voc(tmp_path / "blank", {"x": stripes([0, 0])}, ["x"], ["x"])
    code, _, err = run_cli(["eval", "attention-masks", str(weights), "--data", str(blank), "--device", "cpu"], capsys)
    assert code == 1 and "none of the 1 images has a foreground pixel" in err


@pytest.mark.parametrize("command", ["segment", "attention-masks"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"fastdino eval {command}" in text and "--data" in text and "--which" in text
    assert ("--drop-high-variance" in text) == (command == "segment")
