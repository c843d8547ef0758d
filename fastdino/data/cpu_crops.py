"""DINO multi-crop on the CPU in uint8, as the official PIL pipeline computes it, but faster.

Each crop goes through RandomResizedCrop (torch's antialiased bicubic on uint8,
PIL's filter), then OpenCV in uint8 for flip, colour jitter, grayscale, blur and
solarize, exactly the order and choices of `multicrop.draw_views`. OpenCV and
torch release the GIL, so a small thread pool works on several images at once;
uint8 images are 4x smaller than float ones and the official pipeline rounds to
uint8 between steps too. Normalisation to float is one batched op per view.
multicrop.py's float tensor code is this path's reference (and the GPU path).
"""
import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fastdino.data.multicrop import ViewDraws, augment_params, draw_views, view_specs

SOLARIZE_TABLE = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def resize_crop(image, box, size):
    """uint8 HWC crop `box` (top, left, h, w) of `image` -> uint8 [size, size, 3], antialiased bicubic (as PIL)."""
    top, left, h, w = box
    crop = torch.from_numpy(image[top: top + h, left: left + w]).permute(2, 0, 1)[None]
    resized = F.interpolate(crop.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bicubic",
                            antialias=True, align_corners=False)
    return np.ascontiguousarray(resized[0].permute(1, 2, 0).numpy())


def gray(x):
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)  # ITU-R 601-2 luma, as PIL's "L"


def adjust_brightness(x, factor):  # PIL ImageEnhance.Brightness: blend with black
    return cv2.convertScaleAbs(x, alpha=factor)


def adjust_contrast(x, factor):  # PIL ImageEnhance.Contrast: blend with the mean grey level (rounded)
    mean = int(cv2.mean(gray(x))[0] + 0.5)
    return cv2.addWeighted(x, factor, x, 0.0, mean * (1.0 - factor))


def adjust_saturation(x, factor):  # PIL ImageEnhance.Color: blend with the grey image
    return cv2.addWeighted(x, factor, cv2.cvtColor(gray(x), cv2.COLOR_GRAY2RGB), 1.0 - factor, 0.0)


def adjust_hue(x, shift):
    """torchvision's PIL hue: HSV with hue in 0..255, shifted by int(shift * 255) with wrap-around."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(shift * 255) % 256)  # uint8 arithmetic wraps, as the official
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def three_pass_kernel(sigma):
    """PIL's GaussianBlur(radius=sigma) is three passes of one extended box (see
    multicrop.pil_box_blur_kernels): here the box convolved with itself, one 1-D kernel."""
    var = sigma ** 2 / 3
    l = math.floor((math.sqrt(12 * var + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    box = np.concatenate([[a], np.ones(2 * l + 1), [a]]) / (2 * l + 1 + 2 * a)
    return np.convolve(np.convolve(box, box), box).astype(np.float32)


def gaussian_blur(x, sigma):
    kernel = three_pass_kernel(sigma)
    return cv2.sepFilter2D(x, -1, kernel, kernel, borderType=cv2.BORDER_REPLICATE)


def solarize(x):
    return cv2.LUT(x, SOLARIZE_TABLE)


def augment_crop(x, i, draws, strengths):
    """Flip, colour jitter, grayscale, blur and solarize the uint8 crop x of image i, as `draws` (as lists) says."""
    if draws.flip[i]:
        x = cv2.flip(x, 1)
    if draws.jitter[i]:
        for op_index in draws.jitter_order[i]:
            if strengths[op_index] > 0:  # a zero strength is ColorJitter's "off"
                x = JITTER_OPS[op_index](x, draws.jitter_factors[i][op_index])
    if draws.grayscale[i]:
        x = cv2.cvtColor(gray(x), cv2.COLOR_GRAY2RGB)
    if draws.blur[i]:
        x = gaussian_blur(x, draws.blur_sigma[i])
    if draws.solarize[i]:
        x = solarize(x)
    return x


class CpuMultiCrop:
    """multicrop.multicrop's contract on the CPU: the same draws, uint8 OpenCV pixel work in `threads` threads."""

    def __init__(self, threads=2):
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="fastdino-crops")

    def __call__(self, canvases, sizes, generator, *, n_local_crops=8, global_size=224, local_size=96, params=None,
                 dtype=torch.float32):
        params = augment_params(params)
        specs = view_specs(n_local_crops, global_size, local_size, params)
        draws = draw_views(sizes, generator, n_local_crops=n_local_crops, global_size=global_size,
                           local_size=local_size, params=params)
        batch = len(sizes)
        views = [np.empty((batch, 3, size, size), np.float32) for size, *_ in specs]
        canvases = canvases.numpy()
        draws = [ViewDraws(**{f.name: getattr(d, f.name).tolist() for f in dataclasses.fields(d)}) for d in draws]
        strengths = (params.brightness, params.contrast, params.saturation, params.hue)
        # (x / 255 - mean) / std = x * scale + shift, per channel
        scales = [1 / (255 * s) for s in params.std]
        shifts = [-m / s for m, s in zip(params.mean, params.std)]

        def crop_image(i, height, width):
            image = canvases[i, :height, :width]
            for view, view_draws in zip(views, draws):
                crop = augment_crop(resize_crop(image, view_draws.boxes[i], view.shape[2]), i, view_draws, strengths)
                for channel, plane in enumerate(cv2.split(crop)):  # uint8 HWC -> normalised float CHW
                    cv2.addWeighted(plane, scales[channel], plane, 0.0, shifts[channel], dst=view[i, channel],
                                    dtype=cv2.CV_32F)

        list(self.pool.map(crop_image, range(batch), *zip(*sizes.tolist())))
        return [torch.from_numpy(view).to(dtype) for view in views]

    def close(self):
        self.pool.shutdown(wait=False)
