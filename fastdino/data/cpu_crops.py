"""DINO multi-crop on the CPU in uint8, as the official PIL pipeline computes it, but faster.

The OpenCV backend of the view recipe (recipe.py). Each crop goes through
RandomResizedCrop (torch's antialiased bicubic on uint8, PIL's filter), then OpenCV
in uint8 for flip, colour jitter, grayscale, blur and solarize, exactly the order
and choices of `ViewRecipe.draw`. OpenCV and torch release the GIL, so a small
thread pool works on several images at once; uint8 images are 4x smaller than
float ones and the official pipeline rounds to uint8 between steps too. Each
thread works in its own reused buffers (in-place OpenCV ops), and a batch's float
outputs reuse an earlier batch's arrays once no tensor holds them: fresh
allocations cost page faults, ~10% of the time here.
multicrop.py's float tensor code (the torch backend) is this path's reference.
"""
import dataclasses
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

from fastdino.data.recipe import ViewDraws

# The aten op itself: torch.ops.aten's boxed dispatch costs ~10 us a call, a quarter of a small crop's resize.
_resample_bicubic_aa = torch._C._nn._upsample_bicubic2d_aa


def resize_crop(image, box, size, out=None, scratch=None):
    """uint8 HWC crop `box` (top, left, h, w) of `image` -> uint8 [size, size, 3], antialiased bicubic (as PIL).

    out: the uint8 [size, size, 3] result buffer; scratch: a Scratch to copy the crop into.
    """
    top, left, h, w = box
    crop = image[top: top + h, left: left + w]
    # torch's fast uint8 kernel wants a dense channels-last input; it writes straight into `out`
    if scratch is None:
        source = np.ascontiguousarray(crop)
    else:
        source = scratch.flat("source", h * w * 3)[: h * w * 3].reshape(h, w, 3)
        np.copyto(source, crop)
    if out is None:
        out = np.empty((size, size, 3), np.uint8)
    # the [1, 3, h, w] views made by numpy (a tenth of the cost of torch's permute and indexing)
    _resample_bicubic_aa(torch.from_numpy(source.transpose(2, 0, 1)[None]), [size, size], False,
                         out=torch.from_numpy(out.transpose(2, 0, 1)[None]))
    return out


class Scratch(threading.local):
    """Each thread's reusable work buffers: a fresh allocation per crop step costs page faults."""

    def __init__(self):
        self.buffers = {}

    def get(self, name, shape):
        key = (name, shape)
        if key not in self.buffers:
            self.buffers[key] = np.empty(shape, np.uint8)
        return self.buffers[key]

    def planes(self, size):
        """Three uint8 [size, size] planes (the channels of a crop)."""
        key = ("planes", size)
        if key not in self.buffers:
            self.buffers[key] = [np.empty((size, size), np.uint8) for _ in range(3)]
        return self.buffers[key]

    def flat(self, name, length):
        """A 1-D buffer of at least `length` bytes, grown as needed."""
        buffer = self.buffers.get(name)
        if buffer is None or len(buffer) < length:
            buffer = self.buffers[name] = np.empty(max(length, 2 * len(buffer) if buffer is not None else 0), np.uint8)
        return buffer


def gray(x, out=None):
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY, dst=out)  # ITU-R 601-2 luma, as PIL's "L"


# The jitter ops: uint8 RGB x -> adjusted copy, or into `out` (which may be x itself).
def adjust_brightness(x, factor, out=None, scratch=None):  # PIL ImageEnhance.Brightness: blend with black
    return cv2.convertScaleAbs(x, dst=out, alpha=factor)


def adjust_contrast(x, factor, out=None, scratch=None):  # PIL ImageEnhance.Contrast: blend with the mean grey (rounded)
    mean = int(cv2.mean(gray(x, None if scratch is None else scratch.get("gray", x.shape[:2])))[0] + 0.5)
    return cv2.addWeighted(x, factor, x, 0.0, mean * (1.0 - factor), dst=out)


def adjust_saturation(x, factor, out=None, scratch=None):  # PIL ImageEnhance.Color: blend with the grey image
    grey = None if scratch is None else scratch.get("gray", x.shape[:2])
    grey_rgb = None if scratch is None else scratch.get("gray_rgb", x.shape)
    grey_rgb = cv2.cvtColor(gray(x, grey), cv2.COLOR_GRAY2RGB, dst=grey_rgb)
    return cv2.addWeighted(x, factor, grey_rgb, 1.0 - factor, 0.0, dst=out)


def adjust_hue(x, shift, out=None, scratch=None):
    """torchvision's PIL hue: HSV with hue in 0..255, shifted by int(shift * 255) with wrap-around."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL, dst=None if scratch is None else scratch.get("hsv", x.shape))
    # uint8 arithmetic wraps, as the official; adding [k, 0, 0] repeated along each row is one dense
    # (vectorised) add, twice as fast as adding k to the strided hue channel
    rows = hsv.reshape(hsv.shape[0], -1)
    row_shift = np.zeros(rows.shape[1], np.uint8)
    row_shift[::3] = int(shift * 255) % 256
    np.add(rows, row_shift, out=rows)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL, dst=out)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def three_pass_kernel(sigma):
    """PIL's GaussianBlur(radius=sigma) is three passes of one extended box (see
    pixels.pil_box_blur_kernels): here the box convolved with itself, one 1-D kernel."""
    var = sigma ** 2 / 3
    l = math.floor((math.sqrt(12 * var + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    box = np.concatenate([[a], np.ones(2 * l + 1), [a]]) / (2 * l + 1 + 2 * a)
    return np.convolve(np.convolve(box, box), box).astype(np.float32)


def gaussian_blur(x, sigma, out=None):
    kernel = three_pass_kernel(sigma)
    return cv2.sepFilter2D(x, -1, kernel, kernel, dst=out, borderType=cv2.BORDER_REPLICATE)


def solarize(x, out=None, scratch=None):
    """PIL's ImageOps.solarize(threshold=128): x >= 128 becomes 255 - x. That is min(x, 255 - x), two
    vectorised passes, a fifth of the time of a cv2.LUT table look-up."""
    inverse = cv2.bitwise_not(x, dst=None if scratch is None else scratch.get("inverse", x.shape))
    return cv2.min(x, inverse, dst=out)


def augment_crop(x, i, draws, strengths, scratch=None):
    """Flip, colour jitter, grayscale, blur and solarize the uint8 crop x of image i, as `draws` (as lists) says.

    With a Scratch, x is overwritten and the result is x or the scratch's "spare" buffer (of x's shape).
    """
    spare = None if scratch is None else scratch.get("spare", x.shape)

    def step(result):  # in-place ops write into x; others into the spare buffer, which then swaps with x
        nonlocal x, spare
        if result is spare:
            x, spare = spare, x
        else:
            x = result

    if draws.flip[i]:
        step(cv2.flip(x, 1, dst=spare))
    if draws.jitter[i]:
        for op_index in draws.jitter_order[i]:
            if strengths[op_index] > 0:  # a zero strength is ColorJitter's "off"
                step(JITTER_OPS[op_index](x, draws.jitter_factors[i][op_index],
                                          out=None if scratch is None else x, scratch=scratch))
    if draws.grayscale[i]:
        grey = gray(x, None if scratch is None else scratch.get("gray", x.shape[:2]))
        step(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB, dst=None if scratch is None else x))
    if draws.blur[i]:
        step(gaussian_blur(x, draws.blur_sigma[i], out=spare))
    if draws.solarize[i]:
        step(solarize(x, out=None if scratch is None else x, scratch=scratch))
    return x


KEPT_OUTPUTS = 4  # batches of output arrays kept for reuse: the consumer may hold a few batches at once


def reference_counts(arrays):
    return [sys.getrefcount(a) for a in arrays]  # torch.from_numpy's storage holds one while a tensor lives


class CpuMultiCrop:
    """multicrop.TorchMultiCrop's contract on the CPU: the views of `recipe` from the same draws, uint8
    OpenCV pixel work in `threads` threads, `dtype` outputs; call with (canvases, sizes, generator)."""

    def __init__(self, recipe, *, threads=2, dtype=torch.float32):
        self.recipe, self.dtype = recipe, dtype
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="fastdino-crops")
        self.scratch = Scratch()
        self.outputs = []  # (float32 arrays, their reference counts when nothing but this list held them)
        # (x / 255 - mean) / std = x * scale + shift, per channel
        self.scales = [1 / (255 * s) for s in recipe.augment.std]
        self.shifts = [-m / s for m, s in zip(recipe.augment.mean, recipe.augment.std)]

    def __call__(self, canvases, sizes, generator):
        draws = self.recipe.draw(sizes, generator)
        batch = len(sizes)
        views = self.output_arrays([(batch, 3, view.size, view.size) for view in self.recipe.views])
        canvases = canvases.numpy()
        draws = [ViewDraws(**{f.name: getattr(d, f.name).tolist() for f in dataclasses.fields(d)}) for d in draws]
        strengths, scales, shifts, scratch = self.recipe.jitter_strengths, self.scales, self.shifts, self.scratch

        view_sizes = [view.shape[2] for view in views]

        def crop_image(i, height, width):
            image = canvases[i, :height, :width]
            for view, view_draws, size in zip(views, draws, view_sizes):
                crop_buffer, planes = scratch.get("crop", (size, size, 3)), scratch.planes(size)
                crop = resize_crop(image, view_draws.boxes[i], size, crop_buffer, scratch)
                crop = augment_crop(crop, i, view_draws, strengths, scratch)
                out = view[i]
                for channel, plane in enumerate(cv2.split(crop, planes)):  # uint8 HWC -> normalised float CHW
                    cv2.addWeighted(plane, scales[channel], plane, 0.0, shifts[channel], dst=out[channel],
                                    dtype=cv2.CV_32F)

        list(self.pool.map(crop_image, range(batch), *zip(*sizes.tolist())))
        return [torch.from_numpy(view).to(self.dtype) for view in views]

    def output_arrays(self, shapes):
        """Float32 arrays of `shapes` for a batch's views: an earlier batch's once no tensor (or view of
        one) uses them any more, as writing into freshly allocated memory page-faults every 4 KiB."""
        for arrays, idle_counts in self.outputs:
            if [a.shape for a in arrays] == shapes and reference_counts(arrays) == idle_counts:
                return arrays
        arrays = [np.empty(shape, np.float32) for shape in shapes]
        self.outputs = [(arrays, reference_counts(arrays)), *self.outputs[:KEPT_OUTPUTS - 1]]
        return arrays

    def close(self):
        self.pool.shutdown(wait=False)
