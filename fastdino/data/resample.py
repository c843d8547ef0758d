"""Bicubic resampling with antialiasing, as PIL's `Image.resize(BICUBIC)` (the official RandomResizedCrop's).

Two ways to cut boxes out of images and resize them: `resized_crops`, one
F.interpolate(antialias=True) per crop (the CPU reference), and the batched way
for GPUs: a `ResamplePlan` made on the CPU (PIL's window of every output pixel of
every box), `band_matrices` on the device (those windows' weights as matrices,
a fixed number of kernels) and `resampled_crops` (every crop of a batch in one
matmul for the rows and one per crop size for the columns).
"""
import numpy as np
import torch
import torch.nn.functional as F


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


class ResamplePlan:
    """PIL's antialiased bicubic resampling of many spans, planned on the CPU for `band_matrices`.

    spans: (start, length, out_size[, reverse]) per group of spans of one output size: start and
    length int arrays [n] (the span [start, start + length) of an axis), reverse a bool array [n]
    (that span's output mirrored: a horizontal flip for free). Rows are span-major, output-minor,
    groups one after the other; with `images`, each group's spans are image-major (the same number
    per image) and an image's rows of all groups come together instead. Each output pixel gets
    PIL's window (the kernel stretched by the downscale factor, cut at the span's ends): `count`
    taps from axis position `first`, tap k weighing bicubic(k * a + d) before renormalising.
    `taps` is the widest window, rounded up to a multiple of 8 so that batches share few shapes.
    Raises ValueError for an empty span. Source: torch's _upsample_bicubic2d_aa (PIL's Resample.c).
    """

    def __init__(self, spans, images=None):
        columns = [self._span_rows(*span) for span in spans]  # per group: first, count, a, d as [spans, out_size]
        if images is None:
            self.first, self.count, self.a, self.d = (np.concatenate([c.ravel() for c in cs]) for cs in zip(*columns))
        else:  # each group's spans in `images` equal parts, one per image: an image's rows of all groups together
            self.first, self.count, self.a, self.d = (
                np.concatenate([np.reshape(c, (images, -1)) for c in cs], axis=1).ravel() for cs in zip(*columns))
        self.rows = len(self.first)
        self.taps = -(-int(self.count.max(initial=1)) // 8) * 8

    @staticmethod
    def _span_rows(start, length, out_size, reverse=None):
        start, length = np.asarray(start, np.float64)[:, None], np.asarray(length, np.float64)[:, None]
        if (length < 1).any():
            raise ValueError("a span to resample is empty")
        scale = length / out_size
        filter_scale = np.maximum(scale, 1.0)
        support = 2.0 * filter_scale
        position = np.arange(out_size, dtype=np.float64)[None]
        if reverse is not None:
            position = np.where(np.asarray(reverse, bool)[:, None], out_size - 1 - position, position)
        center = (position + 0.5) * scale
        first = np.maximum(np.floor(center - support + 0.5), 0)
        end = np.minimum(np.floor(center + support + 0.5), length)
        # tap k sits at first + k in the span: its kernel argument is (first + k - center + 0.5) / filter_scale
        a = np.broadcast_to(1 / filter_scale, center.shape)
        # float32, as the device takes them (the positions and counts are integers below 2**24: exact)
        return tuple(x.astype(np.float32) for x in (start + first, end - first, a, (first - center + 0.5) * a))

    def arrays(self):
        """The per-row float32 arrays band_matrices takes, by name."""
        return {name: getattr(self, name) for name in ("first", "count", "a", "d")}


_constants = {}  # (values, dtype, device) -> tensor


def device_constant(values, dtype, device):
    """A tensor of `values` (a number or nested tuples) on `device`, made on first use by a blocking copy:
    one that any CUDA stream may read at once (an asynchronous copy would be ordered on one stream
    only). The batched path asks for the same few constants at every batch, so only its first syncs."""
    key = (values, dtype, str(device))
    if key not in _constants:
        _constants[key] = torch.tensor(values, dtype=dtype).to(device)
    return _constants[key]


def band_matrices(first, count, a, d, taps, width, dtype):
    """The dense matrices of a ResamplePlan, [rows, width + taps] of `dtype` on the device of the
    per-row float32 tensors first, count, a, d ([rows] each, as ResamplePlan.arrays): row r holds
    its window's normalised weights at columns first[r] .. first[r] + count[r] - 1 and zeros
    elsewhere; use [:, :width] (the extra columns catch the taps past a window, weighing zero).
    The weights are computed on the [rows, taps] band (a few MB where the dense matrices take
    hundreds), then scattered: 20 kernels, whatever the number of rows.
    """
    device = first.device
    k = torch.arange(taps, dtype=torch.float32, device=device)  # the tap count changes between batches
    u = torch.addcmul(d[:, None], k, a[:, None]).abs_()
    # a tap past the window weighs bicubic(2) = 0 (the window is cut at the span's end)
    u = torch.where(k < count[:, None], u, 2.0).clamp_(max=2.0)

    def c(value):  # torch.add and addcmul take a tensor first: cached scalars, no copy per batch
        return device_constant(value, torch.float32, device)

    # PIL's cubic (a = -0.5) in Horner form: 1.5u^3 - 2.5u^2 + 1 below 1, -0.5u^3 + 2.5u^2 - 4u + 2 up to 2
    near = torch.addcmul(c(1.0), torch.add(c(-2.5), u, alpha=1.5), u * u)
    far = torch.addcmul(c(2.0), torch.addcmul(c(-4.0), torch.add(c(2.5), u, alpha=-0.5), u), u)
    weights = torch.where(u < 1, near, far)
    normalised = torch.div(weights, weights.sum(dim=1, keepdim=True), out=weights.new_empty(weights.shape, dtype=dtype))
    columns = (first[:, None] + k).long()
    return torch.zeros((len(first), width + taps), dtype=dtype, device=device).scatter_(1, columns, normalised)


def resampled_crops(pixels, rows, groups, cols):
    """The crops of a ResamplePlan as matmuls: all groups' row passes in one bmm, each group's column pass in one.

    pixels: [B, H, W, 3] (float or half, 0..255) on the device; rows: [B, R, H], every image's output
    rows of every group (group-major within an image); groups: (views V, size S) per group, the
    rows of a group V * S per image; cols: per group [V * B, S, W] (view-major). Returns float
    [V * B, 3, S, S] per group in 0..1 (clamped), view-major. Pixels outside the boxes get zero
    weight, so the padding of the canvases is never read. 4 kernels per group plus one.
    """
    batch, height, width, _ = pixels.shape
    resized_rows = rows @ pixels.reshape(batch, height, width * 3)  # [B, R, W * 3], each image read once
    out, start = [], 0
    for (views, size), col in zip(groups, cols):
        part = resized_rows[:, start: start + views * size].view(batch, views, size, width, 3)
        start += views * size
        part = part.permute(1, 0, 4, 2, 3).reshape(views * batch, 3 * size, width)  # the one copy
        crops = (part @ col.transpose(1, 2)).view(views * batch, 3, size, size)
        out.append(torch.div(crops, 255, out=crops.new_empty(crops.shape, dtype=torch.float32)).clamp_(0, 1))
    return out
