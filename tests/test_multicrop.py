"""The CPU (OpenCV uint8) and GPU (batched tensor) multi-crop paths: each op against PIL on a real photo,
the paths against each other, the same random choices for a seed on every path, and the batched
path's kernel count (the structure on the CPU, kernels and host syncs on a GPU)."""
import collections

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastdino.data import cpu_crops as cc
from fastdino.data.cpu_crops import CpuMultiCrop
from fastdino.data.loader import pick_paths
from fastdino.data.multicrop import TorchMultiCrop
from fastdino.data.recipe import ViewRecipe
from fastdino.data.resample import ResamplePlan, band_matrices, resampled_crops
from fastdino.data.sample_data import sample_photos

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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


def batched_resize(canvas, boxes, size, flip=None):
    """The batched resampling of V boxes per image (boxes long [V, B, 4]): float [V * B, 3, size, size] in 0..1."""
    views, batch = boxes.shape[:2]
    top, left, h, w = boxes.numpy().transpose(2, 0, 1)
    plan_rows = ResamplePlan([(top.T.ravel(), h.T.ravel(), size)], images=batch)
    plan_cols = ResamplePlan([(left.ravel(), w.ravel(), size, None if flip is None else flip.ravel())])
    arrays = {name: torch.from_numpy(np.concatenate([plan_rows.arrays()[name], plan_cols.arrays()[name]]))
              for name in ("first", "count", "a", "d")}
    height, width = canvas.shape[1:3]
    matrices = band_matrices(**arrays, taps=max(plan_rows.taps, plan_cols.taps), width=max(height, width),
                             dtype=canvas.dtype)
    rows = matrices[: plan_rows.rows].view(batch, views * size, -1)[..., :height]
    cols = matrices[plan_rows.rows:].view(views * batch, size, -1)[..., :width]
    return resampled_crops(canvas, rows, [(views, size)], [cols])[0]


def test_batched_resize_matches_pil(chelsea):
    pil, x = chelsea
    canvas = torch.zeros(2, 160, 240, 3)  # padded: the weights must never reach the padding
    canvas[0, :150, :226] = torch.from_numpy(x).float()
    canvas[1] = 255
    boxes = [(20, 30, 100, 130), (5, 7, 30, 20), (0, 0, 150, 226), (3, 4, 9, 13)]  # the last two upscale
    views = torch.tensor([[box, (0, 0, 10, 10)] for box in boxes])  # [V, B, 4]
    flip = np.array([[v % 2 == 1, False] for v in range(len(boxes))])
    out = batched_resize(canvas, views, 48, flip)
    assert out.shape == (8, 3, 48, 48)
    for v, (top, left, h, w) in enumerate(boxes):
        reference = pil.crop((left, top, left + w, top + h)).resize((48, 48), Image.Resampling.BICUBIC)
        if flip[v, 0]:  # a mirrored resampling matrix is the flip
            reference = ImageOps.mirror(reference)
        ours = (out[2 * v] * 255).round().permute(1, 2, 0).numpy()
        assert differences(ours, reference).max() <= 1, v
        assert torch.allclose(out[2 * v + 1], torch.tensor(1.0), atol=1e-5)


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


def test_opencv_solarize_is_pils_map_for_every_value():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)  # as an image, and as a 3-channel one
    table = np.where(values >= 128, 255 - values, values)
    assert (cc.solarize(values) == table).all()
    assert (cc.solarize(np.dstack([values] * 3)) == np.dstack([table] * 3)).all()


# ---------------------------------------------------------------- the batched path against the reference

ALL_OPS = dict(color_jitter_p=1.0, grayscale_p=0.5, blur_p=(1.0, 1.0, 1.0), solarize_p=(0.5, 0.5, 0.5))


def random_batch(batch, max_h, max_w, seed):
    """Random uint8 canvases [B, max_h, max_w, 3] (smooth images, noise in the padding) and sizes
    from 9 px (boxes upscale) to the full canvas (awkward, odd sizes)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (batch, 3, 6, 7), generator=generator).float()
    canvases = torch.nn.functional.interpolate(small, size=(max_h, max_w), mode="bilinear").round()
    canvases = canvases.permute(0, 2, 3, 1).contiguous().to(torch.uint8)
    sizes = torch.stack([torch.randint(9, max_h + 1, (batch,), generator=generator),
                         torch.randint(9, max_w + 1, (batch,), generator=generator)], dim=1)
    for i, (h, w) in enumerate(sizes.tolist()):
        canvases[i, h:] = torch.randint(0, 256, canvases[i, h:].shape, generator=generator, dtype=torch.uint8)
        canvases[i, :, w:] = 255
    return canvases, sizes


@pytest.mark.parametrize("batch, n_local, sizes, augment", [
    (5, 10, (64, 32), None),                     # the official views, at small sizes
    (3, 4, (50, 27), ALL_OPS),                   # every op on most crops, odd crop sizes
    (1, 2, (33, 33), dict(hue=0.0)),             # one image, hue off (no hue step), one crop size
    (4, 0, (40, 24), dict(color_jitter_p=0.0)),  # no jitter at all, globals only
    (2, 3, (24, 48), dict(brightness=0.0, saturation=0.0, flip_p=1.0)),  # locals larger than globals
])
def test_batched_path_matches_the_reference(batch, n_local, sizes, augment):
    """The batched path (colour matrices, mirrored resampling, masked blends) computes the reference's
    maths in another order: within 1e-4 in normalised units (it measures ~4e-6) in fp32, and bf16
    outputs round that. No gradients: the data path runs without autograd."""
    canvases, image_sizes = random_batch(batch, 71, 90, seed=batch + n_local)
    recipe = ViewRecipe(n_local, *sizes, augment)
    for seed in range(3):
        reference = TorchMultiCrop(recipe)(canvases, image_sizes, torch.Generator().manual_seed(seed))
        batched, half = (TorchMultiCrop(recipe, batched_resize=True, dtype=dtype)(
            canvases, image_sizes, torch.Generator().manual_seed(seed)) for dtype in (torch.float32, torch.bfloat16))
        assert [v.shape for v in batched] == [v.shape for v in reference] == [
            (batch, 3, s, s) for s in [sizes[0]] * 2 + [sizes[1]] * n_local]
        for a, b, c in zip(reference, batched, half):
            assert b.dtype == torch.float32 and c.dtype == torch.bfloat16
            assert (a - b).abs().max() < 1e-4
            assert torch.allclose(c.float(), b, atol=0.02, rtol=2 ** -8)


class DeviceOps(TorchDispatchMode):
    """Counts the aten ops that touch a tensor on `device`, views and allocations left out: on a GPU
    each of them is a kernel launch or a copy (the structure of the batched path, counted on the CPU)."""

    FREE = {"view", "_unsafe_view", "permute", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze",
            "t", "alias", "as_strided", "detach", "empty", "empty_strided", "new_empty", "reshape", "lift_fresh"}

    def __init__(self, device):
        super().__init__()
        self.device, self.ops = device, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if func.overloadpacket.__name__ not in self.FREE and any(t.device.type == self.device for t in tensors):
            self.ops[func.overloadpacket.__name__] += 1
        return out


EVERY_OP = dict(color_jitter_p=1.0, grayscale_p=1.0, blur_p=(1.0, 1.0, 1.0), solarize_p=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("augment", [None, EVERY_OP])
def test_batched_path_issues_at_most_150_ops_for_12_crops(augment):
    """2 global + 10 local crops on the meta device (shapes only, so the CPU counts what a GPU would
    launch): at most 150 device ops a batch and none per image. A step no crop of a batch drew is
    left out, so with every op drawn by every crop the count is the same for any batch size."""
    crops = TorchMultiCrop(ViewRecipe(10, 64, 32, augment), device="meta", batched_resize=True)
    counts = []
    for batch in (16, 64):  # enough crops that every step has crops with every op (for EVERY_OP)
        canvases, sizes = random_batch(batch, 71, 90, seed=batch)
        crops(canvases, sizes, torch.Generator().manual_seed(0))  # device constants are made once, here
        with DeviceOps("meta") as counter:
            views = crops(canvases, sizes, torch.Generator().manual_seed(1))
        assert [v.shape for v in views] == [(batch, 3, 64, 64)] * 2 + [(batch, 3, 32, 32)] * 10
        counts.append(sum(counter.ops.values()))
        assert counts[-1] <= 150, (counts, counter.ops)
    if augment is EVERY_OP:
        assert counts[0] == counts[1], counts


@needs_cuda
def test_batched_path_on_a_gpu_launches_at_most_150_kernels_and_never_syncs():
    from torch.profiler import ProfilerActivity, profile

    canvases, sizes = random_batch(32, 375, 500, seed=0)
    crops = TorchMultiCrop(ViewRecipe(10, 224, 96), device="cuda", dtype=torch.bfloat16)
    canvases = canvases.cuda()
    crops(canvases, sizes, torch.Generator().manual_seed(0))  # device constants, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as trace:
            views = crops(canvases, sizes, torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    kernels = [e for e in trace.events() if e.device_type.name == "CUDA" and "Memcpy" not in e.name
               and "Memset" not in e.name]
    assert len(kernels) <= 150, collections.Counter(e.name for e in kernels).most_common(20)
    reference = TorchMultiCrop(ViewRecipe(10, 224, 96))(canvases.cpu(), sizes, torch.Generator().manual_seed(1))
    for a, b in zip(reference, views):  # half-precision resampling, bf16 outputs
        assert (b.float().cpu() - a).abs().mean() < 0.02
