"""The CPU (OpenCV uint8) and GPU (batched tensor) multi-crop paths: each op against PIL on a real photo,
the paths against each other, and the same random choices for a seed on every path."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from fastdino.data import cpu_crops as cc
from fastdino.data.cpu_crops import CpuMultiCrop
from fastdino.data.loader import pick_paths
from fastdino.data.multicrop import TorchMultiCrop
from fastdino.data.recipe import ViewRecipe
from fastdino.data.resample import resized_crops_matmul
from fastdino.data.sample_data import sample_photos

PHOTOS = sample_photos()


@pytest.fixture(scope="module")
def chelsea():
    photo = np.ascontiguousarray(PHOTOS["chelsea"][::2, ::2])  # 150 x 226
    return Image.fromarray(photo), photo


@pytest.fixture(scope="module")
def batch():
    """Three photos of different sizes in one padded canvas: (uint8 [3, H, W, 3], sizes [3, 2])."""
    images = [PHOTOS["chelsea"], PHOTOS["astronaut"][:300, :400], PHOTOS["coffee"][50:250, :333]]
    canvases = torch.zeros(3, 300, 451, 3, dtype=torch.uint8)
    for i, image in enumerate(images):
        canvases[i, : image.shape[0], : image.shape[1]] = torch.from_numpy(image)
    return canvases, torch.tensor([image.shape[:2] for image in images])


def differences(ours, reference):
    return np.abs(ours.astype(int) - np.asarray(reference).astype(int))


def pil_hue(image, shift):
    """torchvision's adjust_hue on PIL images (what the official pipeline ran)."""
    h, s, v = image.convert("HSV").split()
    h = np.asarray(h, dtype=np.uint8) + np.uint8(int(shift * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(h, "L"), s, v)).convert("RGB")


def test_opencv_ops_match_pil(chelsea):
    pil, x = chelsea
    assert (cc.solarize(x) == np.asarray(ImageOps.solarize(pil, 128))).all()
    assert differences(cc.cv2.flip(x, 1), ImageOps.mirror(pil)).max() == 0
    gray = cc.cv2.cvtColor(cc.gray(x), cc.cv2.COLOR_GRAY2RGB)
    assert differences(gray, pil.convert("L").convert("RGB")).max() <= 1
    for op, enhancer in ((cc.adjust_brightness, ImageEnhance.Brightness), (cc.adjust_contrast, ImageEnhance.Contrast),
                         (cc.adjust_saturation, ImageEnhance.Color)):
        for factor in (0.6, 1.3):
            assert differences(op(x, factor), enhancer(pil).enhance(factor)).max() <= 1, (op.__name__, factor)
    for shift in (-0.1, 0.04, 0.1):  # OpenCV's and PIL's HSV round differently: a few levels at most
        difference = differences(cc.adjust_hue(x, shift), pil_hue(pil, shift))
        assert difference.mean() < 1.0 and np.quantile(difference, 0.999) <= 8, shift


def test_opencv_blur_and_resize_match_pil(chelsea):
    pil, x = chelsea
    for sigma in (0.1, 0.7, 1.3, 2.0):
        difference = differences(cc.gaussian_blur(x, sigma), pil.filter(ImageFilter.GaussianBlur(sigma)))
        # PIL rounds after each of its 6 passes, and replicates edges at each pass rather than once
        assert difference[8:-8, 8:-8].max() <= 3 and difference.max() <= 8 and difference.mean() < 0.6, sigma
    for (top, left, h, w), size in (((20, 30, 100, 130), 48), ((0, 0, 150, 226), 224), ((5, 7, 30, 20), 64)):
        reference = pil.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
        assert differences(cc.resize_crop(x, (top, left, h, w), size), reference).max() <= 2


def test_batched_matmul_resize_matches_pil(chelsea):
    pil, x = chelsea
    canvas = torch.zeros(2, 160, 240, 3)  # padded: the weights must never reach the padding
    canvas[0, :150, :226] = torch.from_numpy(x).float()
    canvas[1] = 255
    boxes = [(20, 30, 100, 130), (5, 7, 30, 20), (0, 0, 150, 226)]
    views = torch.tensor([[box, (0, 0, 10, 10)] for box in boxes])  # [V, B, 4]
    out = resized_crops_matmul(canvas, views, 48)
    assert out.shape == (6, 3, 48, 48)
    for v, (top, left, h, w) in enumerate(boxes):
        reference = pil.crop((left, top, left + w, top + h)).resize((48, 48), Image.Resampling.BICUBIC)
        ours = out[2 * v].clamp(0, 255).round().permute(1, 2, 0).numpy()
        assert differences(ours, reference).max() <= 1, v
        assert torch.allclose(out[2 * v + 1], torch.tensor(255.0), atol=1e-3)


def test_paths_draw_the_same_choices_and_agree(batch):
    canvases, sizes = batch
    recipe = ViewRecipe(n_local_crops=3, global_size=64, local_size=32)
    generators = [torch.Generator().manual_seed(5) for _ in range(3)]
    opencv = CpuMultiCrop(recipe)(canvases, sizes, generators[0])
    per_crop = TorchMultiCrop(recipe)(canvases, sizes, generators[1])
    batched = TorchMultiCrop(recipe, batched_resize=True)(canvases, sizes, generators[2])
    # every path draws the same numbers in the same order, so the next batch's draws agree too
    assert all(torch.equal(g.get_state(), generators[0].get_state()) for g in generators[1:])
    std = torch.tensor(recipe.augment.std).view(1, 3, 1, 1)
    for a, b, c in zip(opencv, per_crop, batched):
        assert a.shape == b.shape == c.shape and a.dtype == torch.float32
        assert torch.allclose(c, b, atol=1e-3)  # the same float maths, resampled by matmuls
        levels = ((a - b) * std * 255).abs()  # uint8 rounding between steps, as PIL, against float
        assert levels.mean() < 1.0 and torch.quantile(levels.flatten(), 0.99) < 6


def test_opencv_path_seeded_and_typed(batch):
    canvases, sizes = batch
    recipe = ViewRecipe(n_local_crops=2, global_size=40, local_size=24)
    crops, half = CpuMultiCrop(recipe), CpuMultiCrop(recipe, dtype=torch.bfloat16)
    first = crops(canvases, sizes, torch.Generator().manual_seed(1))
    again = half(canvases, sizes, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in first] == [(3, 3, 40, 40)] * 2 + [(3, 3, 24, 24)] * 2
    assert all(b.dtype == torch.bfloat16 and torch.allclose(b.float(), a, atol=0.05) for a, b in zip(first, again))
    other = crops(canvases, sizes, torch.Generator().manual_seed(2))
    assert not torch.equal(first[0], other[0])
    crops.close(), half.close()


def test_opencv_path_reuses_outputs_only_once_released(batch):
    canvases, sizes = batch
    recipe = ViewRecipe(n_local_crops=1, global_size=40, local_size=24)
    crops, fresh = CpuMultiCrop(recipe, threads=2), CpuMultiCrop(recipe, threads=1)
    first = crops(canvases, sizes, torch.Generator().manual_seed(1))
    kept = first[0][1:]  # a view keeps the batch's memory in use after its tensors are gone
    snapshot = kept.clone()
    del first
    second = crops(canvases, sizes, torch.Generator().manual_seed(2))
    assert torch.equal(kept, snapshot)
    released = {view.data_ptr() for view in second}
    del second, kept
    third = crops(canvases, sizes, torch.Generator().manual_seed(3))
    assert {view.data_ptr() for view in third} == released
    expected = fresh(canvases, sizes, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(third, expected))
    crops.close(), fresh.close()


def test_pick_paths():
    assert pick_paths("cpu", "auto", "auto") == (torch.device("cpu"), "cpu", "opencv")
    assert pick_paths("cpu", "cpu", "torch")[2] == "torch"
    if not torch.cuda.is_available():
        assert pick_paths("auto", "auto", "auto") == (torch.device("cpu"), "cpu", "opencv")
        with pytest.raises(ValueError, match="decode=nvjpeg can't run: the device is cpu"):
            pick_paths("cpu", "nvjpeg", "auto")
    with pytest.raises(ValueError, match="opencv runs on the CPU only"):
        pick_paths("cuda", "cpu", "opencv")
    with pytest.raises(ValueError, match="decode must be"):
        pick_paths("cpu", "pil", "auto")
