"""Bicubic resampling with antialiasing, as PIL's `Image.resize(BICUBIC)` (the official RandomResizedCrop's).

Two ways to cut boxes out of images and resize them: `resized_crops`, one
F.interpolate(antialias=True) per crop (the CPU reference), and
`resized_crops_matmul`, which builds PIL's resampling weights of every box as
matrices and resizes all crops of a size in four batched matmuls (for GPUs).
"""
import torch
import torch.nn.functional as F

from fastdino.data.pixels import to_device


def resize(image, size):
    """uint8 or float [1, 3, h, w] in 0..255 -> float [1, 3, *size] in 0..255, bicubic with antialias (as PIL)."""
    return F.interpolate(image.float(), size=size, mode="bicubic", antialias=True, align_corners=False)


def resized_crops(canvases, sizes, view_boxes, view_sizes):
    """Crops boxes out of each image and resizes them: one float [B, 3, s, s] in [0, 1] per view.

    The CPU reference: each image is converted to float once and shared by all its
    crops; crops differ in size, so each is its own F.interpolate call.
    """
    views = [canvases.new_empty((len(sizes), 3, s, s), dtype=torch.float32) for s in view_sizes]
    view_boxes = [boxes.tolist() for boxes in view_boxes]
    for i, (height, width) in enumerate(sizes.tolist()):
        image = canvases[i, :height, :width].permute(2, 0, 1)[None].float()
        for view, boxes, size in zip(views, view_boxes, view_sizes):
            top, left, h, w = boxes[i]
            view[i] = resize(image[:, :, top: top + h, left: left + w], (size, size))[0]
    return [view.clamp_(0, 255).div_(255) for view in views]


def bicubic_filter(x, a=-0.5):
    """PIL's bicubic kernel (a = -0.5), which torch's antialiased bicubic uses too."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start, length, full_length, out_size, device="cpu"):
    """Antialiased bicubic resampling of the spans [start, start + length) of an axis of `full_length`
    pixels to `out_size` pixels, as matrices [N, out_size, full_length] (zero outside each span), built
    on `device`.

    The weights are PIL's (and torch's antialias=True): the kernel is stretched by the
    downscale factor, cut at the span's ends and renormalised, so resampling a crop
    needs no copy of it: one matmul with these matrices per axis.
    """
    start = to_device(start, device).float()[:, None, None]
    length = to_device(length, device).float()[:, None, None]
    scale = length / out_size
    filter_scale = scale.clamp_min(1.0)
    support = 2.0 * filter_scale
    center = (torch.arange(out_size, dtype=torch.float32, device=device)[None, :, None] + 0.5) * scale
    first = torch.floor(center - support + 0.5).clamp_min(0)  # PIL truncates; the same for the values >= 0 kept
    end = torch.minimum(torch.floor(center + support + 0.5), length)
    x = torch.arange(full_length, dtype=torch.float32, device=device)[None, None, :] - start
    weights = bicubic_filter((x - center + 0.5) / filter_scale) * ((x >= first) & (x < end))
    return weights / weights.sum(dim=2, keepdim=True)


def resized_crops_matmul(canvases, boxes, size):
    """RandomResizedCrop of V boxes per image as four batched matmuls, for GPUs.

    canvases: [B, H, W, 3] (float or half, 0..255) on the device; boxes: long [V, B, 4]
    (top, left, height, width) on the CPU. Returns float [V * B, 3, size, size] in 0..255,
    view-major. Pixels outside an image's boxes get zero weight, so padding is never read.
    """
    n_views, batch = boxes.shape[:2]
    _, height, width, _ = canvases.shape
    flat = boxes.reshape(-1, 4)
    rows = resample_weights(flat[:, 0], flat[:, 2], height, size, canvases.device).to(canvases.dtype)
    cols = resample_weights(flat[:, 1], flat[:, 3], width, size, canvases.device).to(canvases.dtype)
    rows = rows.view(n_views, batch, size, height).transpose(0, 1).reshape(batch, n_views * size, height)
    # [B, V*S, H] @ [B, H, W*3]: every view's rows at once, sharing each image
    resized_rows = (rows @ canvases.reshape(batch, height, width * 3)).view(batch, n_views, size, width, 3)
    resized_rows = resized_rows.transpose(0, 1).permute(0, 1, 2, 4, 3).reshape(n_views * batch, size * 3, width)
    out = resized_rows @ cols.transpose(1, 2)  # [V*B, S*3, W] @ [V*B, W, S]
    return out.view(n_views * batch, size, 3, size).permute(0, 2, 1, 3).float()
