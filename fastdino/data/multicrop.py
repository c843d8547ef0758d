"""DINO multi-crop as batched torch ops, on whatever device the images are.

The torch backend of the view recipe (recipe.py, the official `DataAugmentationDINO`'s
views and draws): per batch it draws every choice on the CPU, resamples the crops
(resample.py), augments them with float pixel ops (pixels.py) and normalises them.
Pixels are floats in [0, 1] throughout, not PIL's uint8, so nothing is rounded
between steps. This is the GPU path and the float reference of the OpenCV one
(cpu_crops.py).
"""
import dataclasses

import torch

from fastdino.data.pixels import (IMAGENET_MEAN, IMAGENET_STD, JITTER_OPS, box_blur, grayscale, normalize,
                                  pil_box_blur_kernels, solarize, to_device)
from fastdino.data.recipe import ViewDraws, ViewRecipe
from fastdino.data.resample import resized_crops, resized_crops_matmul

# The ImageNet normalisation is public here too: evaluation code imports it from this module.
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TorchMultiCrop", "augment_view", "multicrop"]


def _apply_where(x, mask, op, *per_image_args):
    """x[mask] = op(x[mask], *args[mask]), computing op only on the chosen images."""
    chosen = mask.nonzero()[:, 0]
    if len(chosen):
        on_device = to_device(chosen, x.device)
        x[on_device] = op(x[on_device], *(to_device(arg[chosen], x.device) for arg in per_image_args))
    return x


def augment_view(x, draws, jitter_strengths):
    """Flip, colour jitter, grayscale, blur and solarize a batch of crops [N, 3, s, s] in [0, 1] in place,
    as `draws` says; jitter_strengths: the recipe's (brightness, contrast, saturation, hue)."""
    x = _apply_where(x, draws.flip, lambda v: v.flip(-1))
    for step in range(4):
        for op_index, (op, strength) in enumerate(zip(JITTER_OPS, jitter_strengths)):
            if strength > 0:  # a zero strength is ColorJitter's "off"
                mask = draws.jitter & (draws.jitter_order[:, step] == op_index)
                x = _apply_where(x, mask, op, draws.jitter_factors[:, op_index])
    x = _apply_where(x, draws.grayscale, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    # kernels built on the CPU from the CPU draws: no device sync
    x = _apply_where(x, draws.blur, box_blur, pil_box_blur_kernels(draws.blur_sigma))
    return _apply_where(x, draws.solarize, solarize)


def _cat_draws(draws):
    return ViewDraws(*(torch.cat([getattr(d, f.name) for d in draws]) for f in dataclasses.fields(ViewDraws)))


class TorchMultiCrop:
    """The views of `recipe` for batches of decoded images, as torch ops on `device`.

    Call with (canvases, sizes, generator): canvases uint8 [B, max_h, max_w, 3] with image i
    in its top-left sizes[i] = (h, w), on any device; sizes long [B, 2] on the CPU. Returns
    [global1, global2, local1, ..., localN], normalised `dtype` tensors [B, 3, s, s] on `device`.
    batched_resize (default: on GPUs) resamples the crops of a size together
    (resized_crops_matmul) and augments them together; otherwise each crop is its own
    F.interpolate, the float reference of the OpenCV path (cpu_crops.py).
    """

    def __init__(self, recipe, *, device="cpu", dtype=torch.float32, batched_resize=None):
        self.recipe, self.device, self.dtype = recipe, torch.device(device), dtype
        self.batched_resize = self.device.type == "cuda" if batched_resize is None else batched_resize
        sizes = [view.size for view in recipe.views]
        # the views resampled together: those of one size, globals first, then locals (if another size)
        self.size_groups = [(size, [v for v, s in enumerate(sizes) if s == size]) for size in dict.fromkeys(sizes)]

    def __call__(self, canvases, sizes, generator):
        recipe = self.recipe
        draws = recipe.draw(sizes, generator)
        canvases = canvases.to(self.device, non_blocking=True)
        batch = len(sizes)
        if self.batched_resize:
            # integers 0..255 are exact in half, and GPU matmuls accumulate in fp32
            pixels = canvases.half() if self.device.type == "cuda" else canvases.float()
            groups = []
            for size, members in self.size_groups:
                boxes = torch.stack([draws[v].boxes for v in members])
                crops = resized_crops_matmul(pixels, boxes, size).clamp_(0, 255).div_(255)
                groups.append((members, crops))
        else:
            views = resized_crops(canvases, sizes, [d.boxes for d in draws], [view.size for view in recipe.views])
            groups = [([v], view) for v, view in enumerate(views)]
        out = [None] * len(recipe.views)
        for members, crops in groups:
            crops = normalize(augment_view(crops, _cat_draws([draws[v] for v in members]), recipe.jitter_strengths),
                              recipe.augment.mean, recipe.augment.std, self.dtype)
            for k, v in enumerate(members):
                out[v] = crops[k * batch: (k + 1) * batch]
        return out


def multicrop(canvases, sizes, generator, *, n_local_crops=8, global_size=224, local_size=96, augment=None,
              device="cpu", dtype=torch.float32, batched_resize=None):
    """DINO's views of one batch without a loader (tests, one-off batches): `TorchMultiCrop` of the
    recipe ViewRecipe(n_local_crops, global_size, local_size, augment), made for this call."""
    recipe = ViewRecipe(n_local_crops, global_size, local_size, augment)
    return TorchMultiCrop(recipe, device=device, dtype=dtype, batched_resize=batched_resize)(canvases, sizes, generator)
