"""`fastdino eval video`: J and F (DAVIS-2017 toolkit semantics), label propagation, the command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage.morphology import disk

from fastdino import cli, models
from fastdino.eval import video as video_module
from fastdino.eval.video import (boundary_f_measure, boundary_map, boundary_radius, davis_palette, davis_statistics,
                                 feature_size, jaccard, labels_to_segmentation, propagate_labels, read_davis)


# ---------------------------------------------------------------------------------------------
# Straightforward references, written from the definitions

def reference_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool).ravel().tolist(), b.astype(bool).ravel().tolist()
    union = sum(x or y for x, y in zip(a, b))
    return 1.0 if union == 0 else sum(x and y for x, y in zip(a, b)) / union


def reference_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixel by pixel: differs from the right, lower or lower-right neighbour; on the last row
    or column only the neighbour that exists counts; the corner never."""
    mask = mask.astype(bool)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for r in range(height):
        for c in range(width):
            if r == height - 1 and c == width - 1:
                continue
            if r == height - 1:
                out[r, c] = mask[r, c] != mask[r, c + 1]
            elif c == width - 1:
                out[r, c] = mask[r, c] != mask[r + 1, c]
            else:
                out[r, c] = any(mask[r, c] != mask[r + dr, c + dc] for dr, dc in ((0, 1), (1, 0), (1, 1)))
    return out


def reference_f(truth: np.ndarray, predicted: np.ndarray, radius: float) -> float:
    """Brute-force nearest distances between boundary pixels."""
    gt, seg = np.argwhere(reference_boundary(truth)), np.argwhere(reference_boundary(predicted))
    if len(gt) == 0 or len(seg) == 0:
        return 1.0 if len(gt) == len(seg) else 0.0
    distances = np.sqrt(((gt[:, None, :] - seg[None, :, :]) ** 2).sum(-1))
    precision = (distances.min(axis=0) <= radius).mean()
    recall = (distances.min(axis=1) <= radius).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def toolkit_style_f(truth: np.ndarray, predicted: np.ndarray, radius: int) -> float:
    """The davis2017-evaluation way: dilate each boundary with disk(radius) and intersect."""
    gt, seg = reference_boundary(truth), reference_boundary(predicted)
    if not gt.any() or not seg.any():
        return 1.0 if gt.any() == seg.any() else 0.0
    precision = (seg & ndimage.binary_dilation(gt, structure=disk(radius))).sum() / seg.sum()
    recall = (gt & ndimage.binary_dilation(seg, structure=disk(radius))).sum() / gt.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def reference_propagation(target, sources, labels, grid, topk, temperature, neighbourhood):
    """The official label_propagation, loop-built window: exp(sim / T) zeroed outside the window,
    below the k-th largest over all context patches, normalised, times the labels."""
    context, n, _ = sources.shape
    height, width = grid
    window = torch.ones(n, n)
    if neighbourhood > 0:
        window.zero_()
        for i in range(n):
            for j in range(n):
                if abs(i // width - j // width) <= neighbourhood and abs(i % width - j % width) <= neighbourhood:
                    window[i, j] = 1
    affinity = torch.stack([torch.exp(target @ sources[t].T / temperature) * window for t in range(context)])
    affinity = affinity.permute(0, 2, 1).reshape(context * n, n)  # [keys, queries]
    kth = affinity.topk(topk, dim=0).values.min(dim=0).values
    affinity[affinity < kth] = 0
    affinity = affinity / affinity.sum(dim=0, keepdim=True)
    return (labels.reshape(context * n, -1).T @ affinity).T


def all_pairs_then_mask(target, sources, labels, grid, topk, temperature, neighbourhood):
    """Every target patch against every context patch, the window applied afterwards as a mask
    of -inf: what propagate_labels computed before it scored only the window."""
    context, n, _ = sources.shape
    rows, cols = torch.arange(n) // grid[1], torch.arange(n) % grid[1]
    near = ((rows[:, None] - rows[None]).abs() <= neighbourhood) & ((cols[:, None] - cols[None]).abs() <= neighbourhood)
    similarity = (target @ sources.reshape(context * n, -1).T).view(n, context, n)
    similarity = similarity.masked_fill(~near[:, None], float("-inf")).view(n, context * n)
    values, indices = similarity.topk(min(topk, context * n), dim=1)
    weights = torch.softmax(values / temperature, dim=1)
    return torch.einsum("qk,qkc->qc", weights, labels.reshape(context * n, -1)[indices])


def square(shape, top, left, side):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


# ---------------------------------------------------------------------------------------------
# J and F

def test_jaccard_hand_cases():
    a = square((6, 6), 1, 1, 2)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, square((6, 6), 4, 4, 2)) == 0.0
    empty = np.zeros((6, 6), bool)
    assert jaccard(empty, empty) == 1.0  # DAVIS: an object absent and not predicted is right
    assert jaccard(a, empty) == 0.0 and jaccard(empty, a) == 0.0
    assert jaccard(a, square((6, 6), 1, 2, 2)) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="one shape"):
        jaccard(a, a[:5])


def test_boundary_map_of_one_pixel_is_offset_towards_the_origin():
    mask = np.zeros((3, 3), bool)
    mask[1, 1] = True
    assert boundary_map(mask).astype(int).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    full = np.ones((4, 5), bool)
    assert not boundary_map(full).any()  # the image border is no boundary


def test_boundary_f_hand_cases():
    shape = (48, 64)
    assert boundary_radius(shape) == 1  # ceil(0.008 * 80)
    assert boundary_radius((480, 854)) == 8
    gt = square(shape, 10, 10, 20)
    empty = np.zeros(shape, bool)
    assert boundary_f_measure(gt, gt) == 1.0
    assert boundary_f_measure(gt, square(shape, 10, 40, 5)) == 0.0
    assert boundary_f_measure(empty, empty) == 1.0
    assert boundary_f_measure(gt, empty) == 0.0 and boundary_f_measure(empty, gt) == 0.0
    # One pixel to the right: every boundary pixel is within the 1-pixel tolerance.
    assert boundary_f_measure(gt, square(shape, 10, 11, 20)) == 1.0
    # Three to the right: of each 80-pixel ring, the two horizontal sides (19 pixels each within
    # reach) and the two ends of one vertical side match: precision = recall = 40 / 80.
    assert boundary_f_measure(gt, square(shape, 10, 13, 20)) == pytest.approx(0.5)
    assert boundary_f_measure(gt, square(shape, 10, 13, 20), tolerance=3) == 1.0  # >= 1: pixels


@pytest.mark.parametrize("seed", range(6))
def test_j_and_f_match_straightforward_implementations(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 23)

    def blob():
        return ndimage.gaussian_filter(rng.normal(size=shape), 1.5) > rng.uniform(-0.1, 0.2)

    truth, predicted = blob(), blob()
    assert boundary_map(truth).tolist() == reference_boundary(truth).tolist()
    assert jaccard(truth, predicted) == pytest.approx(reference_jaccard(truth, predicted))
    for tolerance in (0.008, 2, 0.1):
        radius = boundary_radius(shape, tolerance)
        expected = reference_f(truth, predicted, radius)
        assert boundary_f_measure(truth, predicted, tolerance) == pytest.approx(expected)
        assert toolkit_style_f(truth, predicted, int(radius)) == pytest.approx(expected)


def test_davis_statistics_hand_case():
    stats = davis_statistics([1.0, 0.4, 0.6, 0.2])
    assert stats["mean"] == pytest.approx(0.55)
    assert stats["recall"] == pytest.approx(0.5)
    # The toolkit's bins for 4 frames are [0, 1], [1], [1, 2], [2, 3].
    assert stats["decay"] == pytest.approx(0.7 - 0.4)
    with pytest.raises(ValueError):
        davis_statistics([])


# ---------------------------------------------------------------------------------------------
# Propagation

def test_feature_size_floors_to_patches():
    assert feature_size((480, 854), 480, 16) == (480, 848)
    assert feature_size((48, 64), 48, 8) == (48, 64)
    assert feature_size((854, 480), 240, 16) == (416, 240)
    assert feature_size((10, 10), 3, 8) == (8, 8)


def test_identical_frames_keep_the_first_mask():
    torch.manual_seed(0)
    grid = (5, 6)
    features = F.normalize(torch.randn(30, 64), dim=1)
    mask = torch.from_numpy(square(grid, 1, 2, 3).ravel().astype(np.int64))
    labels = F.one_hot(mask, 2).float()
    soft = propagate_labels(features, features[None], labels[None], grid)
    assert torch.equal(soft.argmax(1), mask)
    # Then again from the first frame and the propagated frame.
    soft = propagate_labels(features, torch.stack([features, features]), torch.stack([labels, soft]), grid)
    assert torch.equal(soft.argmax(1), mask)


def test_translating_square_follows_its_content():
    """Features are one-hot content ids; the content moves one patch right per frame (wrapping
    around, so that every patch has its exact match in every earlier frame)."""
    height, width, frames = 5, 6, 3
    grid = (height, width)

    def frame_features(t):
        rows, cols = np.divmod(np.arange(height * width), width)
        return F.one_hot(torch.from_numpy(rows * width + (cols - t) % width), height * width).float()

    first_mask = torch.from_numpy(square(grid, 1, 1, 2).ravel().astype(np.int64))
    context_features, context_labels = [frame_features(0)], [F.one_hot(first_mask, 2).float()]
    for t in range(1, frames):
        soft = propagate_labels(frame_features(t), torch.stack(context_features), torch.stack(context_labels), grid)
        assert soft.argmax(1).tolist() == square(grid, 1, 1 + t, 2).ravel().astype(int).tolist()
        context_features.append(frame_features(t))
        context_labels.append(soft)


def test_neighbour_outside_the_window_is_ignored():
    grid = (1, 6)
    e = torch.eye(7)
    target = e[0].repeat(6, 1)  # every target patch looks like e0
    # Columns 0-4 are somewhat like e0 (cosine 0.45); only column 5 matches exactly.
    sources = torch.stack([*F.normalize(0.5 * e[0] + e[1:6], dim=1), e[0]])
    labels = F.one_hot(torch.tensor([0, 0, 0, 0, 0, 1]), 2).float()
    anywhere = propagate_labels(target, sources[None], labels[None], grid, neighbourhood=0)
    assert anywhere[0, 1] > 0.95
    near = propagate_labels(target, sources[None], labels[None], grid, neighbourhood=2)
    assert near[0].tolist() == pytest.approx([1.0, 0.0])  # column 5 is 5 patches away from column 0
    assert near[3, 1] > 0.95  # ... but 2 away from column 3


@pytest.mark.parametrize("neighbourhood,topk", [(1, 5), (2, 3), (0, 7)])
def test_propagation_matches_the_official_formulation(neighbourhood, topk):
    torch.manual_seed(neighbourhood)
    grid, context = (4, 5), 3
    target = F.normalize(torch.randn(20, 16), dim=1)
    sources = F.normalize(torch.randn(context, 20, 16), dim=2)
    labels = torch.softmax(torch.randn(context, 20, 3), dim=2)
    ours = propagate_labels(target, sources, labels, grid, topk=topk, temperature=0.1, neighbourhood=neighbourhood)
    expected = reference_propagation(target, sources, labels, grid, topk, 0.1, neighbourhood)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile,chunk", [(1, 2 ** 24), (3, 1), (12, 2 ** 24)])  # chunk 1: one tile per batch
@pytest.mark.parametrize("grid,context,neighbourhood,topk", [
    ((7, 9), 2, 1, 5),  # odd sides, the smallest window
    ((1, 11), 3, 2, 5),  # a single row
    ((13, 3), 2, 4, 5),  # the window spans the width but not the height
    ((17, 23), 3, 5, 5),  # several tiles, the last ones cut short
    ((11, 10), 2, 1, 20),  # more neighbours than a corner's window holds: -inf ones weigh nothing
    ((5, 6), 2, 20, 5),  # the window covers the grid
])
def test_windowed_propagation_matches_all_pairs_then_mask(monkeypatch, tile, chunk, grid, context, neighbourhood,
                                                          topk):
    monkeypatch.setattr(video_module, "WINDOW_TILE", tile)
    monkeypatch.setattr(video_module, "WINDOW_CHUNK", chunk)
    generator = torch.Generator().manual_seed(grid[0] * 100 + grid[1])
    n = grid[0] * grid[1]
    target = F.normalize(torch.randn(n, 24, generator=generator), dim=1)
    sources = F.normalize(torch.randn(context, n, 24, generator=generator), dim=2)
    labels = torch.softmax(3 * torch.randn(context, n, 4, generator=generator), dim=2)
    ours = propagate_labels(target, sources, labels, grid, topk=topk, temperature=0.1, neighbourhood=neighbourhood)
    expected = all_pairs_then_mask(target, sources, labels, grid, topk, 0.1, neighbourhood)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.argmax(1), expected.argmax(1))
    frame = (grid[0] * 4, grid[1] * 4)
    assert np.array_equal(labels_to_segmentation(ours, grid, 4, frame),
                          labels_to_segmentation(expected, grid, 4, frame))


def test_labels_to_segmentation_upsamples_and_rescales_each_label():
    # Along a straight edge between two labels, bilinear upsampling is the nearest one.
    mask = np.array([[2, 2, 0], [2, 2, 0]])
    soft = F.one_hot(torch.from_numpy(mask).flatten(), 3).float()
    assert labels_to_segmentation(soft, (2, 3), 4, (8, 12)).tolist() == np.kron(mask, np.ones((4, 4), int)).tolist()
    # Then resized (nearest) to the frame.
    assert labels_to_segmentation(soft, (2, 3), 4, (4, 6)).tolist() == np.kron(mask, np.ones((2, 2), int)).tolist()
    # A faint object (at most 0.3) beats the background where it peaks, once each label is min-max scaled.
    background = torch.full((9,), 1.0)
    background[4] = 0.7
    faint = torch.zeros(9)
    faint[4] = 0.3
    segmentation = labels_to_segmentation(torch.stack([background, faint], dim=1), (3, 3), 1, (3, 3))
    assert segmentation.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# The command on a tiny DAVIS folder

def write_davis(root, videos=("walk", "pair"), count=4, size=(48, 64)):
    rng = np.random.default_rng(0)
    palette = davis_palette()
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(videos) + "\n")
    height, width = size
    for v, name in enumerate(videos):
        background = (ndimage.gaussian_filter(rng.uniform(0, 255, (height, width, 3)), (3, 3, 0)) * 1.5 - 60)
        for t in range(count):
            labels = np.zeros(size, np.uint8)
            labels[10:26, 8 + 4 * t:24 + 4 * t] = 1
            if v == 1:
                labels[30:44, 40 - 3 * t:52 - 3 * t] = 2
            frame = background.copy()
            frame[labels == 1] = (230, 40, 40)
            frame[labels == 2] = (40, 40, 230)
            for folder in ("JPEGImages", "Annotations"):
                (root / folder / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame.clip(0, 255).astype(np.uint8)).save(
                root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            annotation = Image.fromarray(labels)
            annotation.putpalette(palette.ravel().tolist())
            annotation.save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
    return root


@pytest.fixture(scope="module")
def davis_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("video")
    root = write_davis(tmp / "davis")
    torch.manual_seed(0)
    checkpoint = tmp / "w.pth"
    torch.save(models.vit_tiny(patch_size=8, depth=2, img_size=[48]).state_dict(), checkpoint)
    out = tmp / "out"
    rc = cli.main(["eval", "video", str(checkpoint), "--data", str(root), "--size", "48", "--device", "cpu",
                   "--json", str(out / "video.json"), "--png", str(out / "png"), "--save-masks", str(out / "masks")])
    return root, checkpoint, out, rc


def test_command_writes_json_png_and_masks(davis_run):
    root, checkpoint, out, rc = davis_run
    assert rc == 0
    results = json.loads((out / "video.json").read_text())
    for key in ("J&F-Mean", "J-Mean", "F-Mean", "J-Recall", "F-Recall", "J-Decay", "F-Decay"):
        assert math.isfinite(results[key])
    assert results["J&F-Mean"] == pytest.approx((results["J-Mean"] + results["F-Mean"]) / 2)
    assert results["objects"] == 3 and results["frames"] == 8
    assert set(results["videos"]) == {"walk", "pair"}
    assert set(results["videos"]["pair"]["objects"]) == {"1", "2"}
    assert results["videos"]["walk"]["feature_grid"] == [6, 8]
    settings = results["settings"]
    assert settings["n_last_frames"] == 7 and settings["topk"] == 5 and settings["size_mask_neighborhood"] == 12
    assert settings["temperature"] == 0.1 and settings["patch_size"] == 8 and settings["arch"] == "vit_tiny"
    assert results["checkpoint"] == str(checkpoint)

    per_object = [s for v in results["videos"].values() for s in v["objects"].values()]
    assert results["J-Mean"] == pytest.approx(np.mean([s["J"] for s in per_object]))
    # The saved masks, scored here from scratch over frames 1 and 2 (DAVIS leaves out the first and last).
    for name, video in results["videos"].items():
        saved = sorted((out / "masks" / name).glob("*.png"))
        assert [p.name for p in saved] == [f"{t:05d}.png" for t in range(4)]
        with Image.open(saved[0]) as first, Image.open(root / "Annotations" / "480p" / name / "00000.png") as given:
            assert first.mode == "P" and np.array_equal(np.asarray(first), np.asarray(given))
        for obj, scores in video["objects"].items():
            j, f = [], []
            for t in (1, 2):
                predicted = np.asarray(Image.open(saved[t])) == int(obj)
                truth = np.asarray(Image.open(root / "Annotations" / "480p" / name / f"{t:05d}.png")) == int(obj)
                j.append(reference_jaccard(truth, predicted))
                f.append(reference_f(truth, predicted, 1))
            assert scores["J"] == pytest.approx(100 * np.mean(j))
            assert scores["F"] == pytest.approx(100 * np.mean(f))
    for name in ("walk", "pair"):
        with Image.open(out / "png" / f"{name}.png") as picture:
            assert picture.width > 100 and picture.height > 50
    assert not (out / "video_png").exists()  # --png given: nothing beside the JSON


def test_command_options_and_errors(davis_run, tmp_path, capsys):
    root, checkpoint, _, _ = davis_run
    json_path = tmp_path / "one.json"
    assert cli.main(["eval", "video", str(checkpoint), "--data", str(root), "--videos", "pair", "--size", "32",
                     "--n-last-frames", "1", "--topk", "2", "--size-mask-neighborhood", "1",
                     "--drop-high-variance", "4", "--device", "cpu", "--json", str(json_path)]) == 0
    results = json.loads(json_path.read_text())
    assert list(results["videos"]) == ["pair"] and results["settings"]["drop_high_variance"] == 4
    assert results["videos"]["pair"]["feature_grid"] == [4, 5]  # 32 x 43 floored to patches of 8
    assert [p.name for p in (tmp_path / "one_png").iterdir()] == ["pair.png"]  # without --png: beside the JSON
    capsys.readouterr()

    assert cli.main(["eval", "video", str(checkpoint), "--data", str(root), "--videos", "nope"]) == 1
    assert "no frames" in capsys.readouterr().err
    assert cli.main(["eval", "video", str(checkpoint), "--data", str(tmp_path / "missing")]) == 1
    assert "JPEGImages/480p" in capsys.readouterr().err
    assert cli.main(["eval", "video", str(checkpoint), "--data", str(root), "--topk", "0"]) == 1
    assert "--topk must be at least 1" in capsys.readouterr().err


def test_bad_davis_folders(tmp_path):
    root = write_davis(tmp_path / "davis", videos=("walk",), count=3)
    (root / "Annotations" / "480p" / "walk" / "00001.png").unlink()
    with pytest.raises(FileNotFoundError, match="00001.png"):
        read_davis(root)
    short = write_davis(tmp_path / "short", videos=("walk",), count=2)
    with pytest.raises(ValueError, match="at least 3"):
        read_davis(short)
    (short / "ImageSets" / "2017" / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="--videos"):
        read_davis(short)


def test_annotation_of_another_size_is_refused(tmp_path, capsys):
    root = write_davis(tmp_path / "davis", videos=("walk",), count=3)
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(root / "Annotations" / "480p" / "walk" / "00001.png")
    torch.save(models.vit_tiny(patch_size=8, depth=1, img_size=[48]).state_dict(), tmp_path / "w.pth")
    assert cli.main(["eval", "video", str(tmp_path / "w.pth"), "--data", str(root), "--size", "16",
                     "--device", "cpu"]) == 1
    assert "00001.png is 64x40 but its frame is 64x48" in capsys.readouterr().err
