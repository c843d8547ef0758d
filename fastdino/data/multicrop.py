"""DINO multi-crop augmentation as batched torch ops, on whatever device the images are.

The views and their order are the official `DataAugmentationDINO`'s: two global
crops then N local crops, each RandomResizedCrop (bicubic, antialiased) ->
horizontal flip -> colour jitter (its four parts in a random order) -> grayscale
-> Gaussian blur -> solarize -> normalise. Pixels are floats in [0, 1] throughout,
not PIL's uint8, so nothing is rounded between steps.

Every random choice for a batch is drawn up front on the CPU from one
torch.Generator (`draw_view`), so a seed gives the same boxes and choices on any
device; only the pixel arithmetic runs on the images' device.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

# PIL's "L" conversion (ITU-R 601-2 luma), which the official PIL pipeline used for
# grayscale, contrast and saturation.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentParams:
    """The official DINO augmentation settings (configs/default.yaml -> data.augment)."""
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: tuple = (0.0, 0.2, 0.0)  # global crop 1, global crop 2, local crops
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def augment_params(augment=None):
    """AugmentParams from None (the defaults), or overrides in a mapping, OmegaConf node or dataclass."""
    if augment is None:
        return AugmentParams()
    if isinstance(augment, AugmentParams):
        return augment
    if OmegaConf.is_config(augment):
        values = OmegaConf.to_container(augment, resolve=True)
    elif dataclasses.is_dataclass(augment):
        values = dataclasses.asdict(augment)
    else:
        values = dict(augment)
    known = {f.name for f in dataclasses.fields(AugmentParams)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"unknown augment keys {unknown}; known: {sorted(known)}")
    return dataclasses.replace(AugmentParams(), **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                                   for k, v in values.items()})


# ---------------------------------------------------------------- random draws (CPU)

def _uniform(n, low, high, generator, dtype=torch.float32):
    return low + (high - low) * torch.rand(n, generator=generator, dtype=dtype)


def sample_crop_boxes(heights, widths, scale, ratio, generator, tries=10):
    """torchvision's RandomResizedCrop box sampling for a batch: returns long [B, 4] (top, left, height, width).

    Each image makes `tries` draws of (area fraction, log aspect ratio); the first
    box that fits the image wins, at a uniformly random position. When none fits,
    the box is the central crop at the allowed ratio nearest the image's own.
    """
    n = len(heights)
    img_h, img_w = heights.double(), widths.double()
    area = (img_h * img_w)[:, None] * _uniform((n, tries), scale[0], scale[1], generator, torch.float64)
    aspect = torch.exp(_uniform((n, tries), math.log(ratio[0]), math.log(ratio[1]), generator, torch.float64))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= img_w[:, None]) & (h > 0) & (h <= img_h[:, None])
    first_fit = fits.byte().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    w, h = w.gather(1, first_fit)[:, 0], h.gather(1, first_fit)[:, 0]

    low_ratio, high_ratio = min(ratio), max(ratio)
    img_ratio = img_w / img_h
    too_tall, too_wide = img_ratio < low_ratio, img_ratio > high_ratio
    fallback_w = torch.where(too_wide, torch.round(img_h * high_ratio), img_w)
    fallback_h = torch.where(too_tall, torch.round(img_w / low_ratio), img_h)
    h, w = torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)

    position = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(position[:, 0] * (img_h - h + 1)), torch.floor((img_h - h) / 2))
    left = torch.where(found, torch.floor(position[:, 1] * (img_w - w + 1)), torch.floor((img_w - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


@dataclass
class ViewDraws:
    """Every random choice for one view of a batch of B images (CPU tensors)."""
    boxes: torch.Tensor           # long [B, 4]: top, left, height, width in the source image
    flip: torch.Tensor            # bool [B]
    jitter: torch.Tensor          # bool [B]: apply colour jitter at all
    jitter_factors: torch.Tensor  # [B, 4]: brightness, contrast, saturation factors and hue shift
    jitter_order: torch.Tensor    # long [B, 4]: per image, the order to apply those four in
    grayscale: torch.Tensor       # bool [B]
    blur: torch.Tensor            # bool [B]
    blur_sigma: torch.Tensor      # [B]
    solarize: torch.Tensor        # bool [B]


def draw_view(sizes, scale, blur_p, solarize_p, params, generator):
    """Draws one view's choices for images of `sizes` (long [B, 2] as h, w), as torchvision would."""
    n = len(sizes)

    def coin(p):
        return torch.rand(n, generator=generator) < p

    def factor_range(strength):  # ColorJitter's [max(0, 1 - s), 1 + s]
        return max(0.0, 1 - strength), 1 + strength

    boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], scale, params.ratio, generator)
    flip = coin(params.flip_p)
    jitter = coin(params.color_jitter_p)
    jitter_factors = torch.stack([
        _uniform(n, *factor_range(params.brightness), generator),
        _uniform(n, *factor_range(params.contrast), generator),
        _uniform(n, *factor_range(params.saturation), generator),
        _uniform(n, -params.hue, params.hue, generator),
    ], dim=1)
    jitter_order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    grayscale = coin(params.grayscale_p)
    blur = coin(blur_p)
    blur_sigma = _uniform(n, params.blur_sigma[0], params.blur_sigma[1], generator)
    solarize = coin(solarize_p)
    return ViewDraws(boxes, flip, jitter, jitter_factors, jitter_order, grayscale, blur, blur_sigma, solarize)


# ---------------------------------------------------------------- pixel ops ([N, 3, H, W] in [0, 1])

def to_device(tensor, device):
    """A small CPU tensor on `device` without a host sync: a blocking copy to a GPU would wait for
    all queued GPU work, while an asynchronous one from pageable memory is staged at once."""
    return tensor.to(device, non_blocking=True)


def channel_constants(values, like):
    return to_device(torch.tensor(values, dtype=like.dtype), like.device).view(1, 3, 1, 1)


def resize(image, size):
    """uint8 or float [1, 3, h, w] in 0..255 -> float [1, 3, *size] in 0..255, bicubic with antialias (as PIL)."""
    return F.interpolate(image.float(), size=size, mode="bicubic", antialias=True, align_corners=False)


def grayscale(x):
    weights = channel_constants(LUMA_WEIGHTS, x)
    return (x * weights).sum(dim=1, keepdim=True)


def adjust_brightness(x, factor):
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x, factor):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean, x, factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_saturation(x, factor):
    return torch.lerp(grayscale(x), x, factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_hue(x, shift):
    """Rotates hue by `shift` turns, keeping HSV saturation and value."""
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1)[0]
    r, g, b = x.unbind(dim=1)
    safe_chroma = chroma.clamp_min(1e-12)
    hue6 = torch.where(value == r, (g - b) / safe_chroma,  # hue in sextants, 0..6
                       torch.where(value == g, 2 + (b - r) / safe_chroma, 4 + (r - g) / safe_chroma))
    hue6 = torch.remainder(hue6 + 6 * shift.view(-1, 1, 1), 6)
    # HSV -> RGB: channel c = V - C * clamp(min(k, 4 - k), 0, 1), k = (n_c + H6) mod 6, n = 5, 3, 1 for R, G, B
    n = channel_constants([5.0, 3.0, 1.0], x)
    k = torch.remainder(n + hue6[:, None], 6)
    return value[:, None] - chroma[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def solarize(x):
    """PIL ImageOps.solarize(threshold=128): values >= 128/255 are inverted."""
    return torch.where(x >= 128 / 255, 1 - x, x)


def pil_box_blur_kernels(sigma):
    """The 1-D kernels [N, 2R+1] of PIL's GaussianBlur(radius=sigma), one per sigma.

    PIL approximates a Gaussian of std sigma by three passes of an "extended" box
    (Gwosdek et al. 2011): 2l+1 full taps plus one tap of weight a at each end,
    with l and a chosen so the three passes have variance sigma^2 exactly. Kernels
    are zero-padded to the widest one so a batch shares a shape.
    """
    sigma = sigma.double()
    var = sigma ** 2 / 3
    l = torch.floor((torch.sqrt(12 * var + 1) - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * var) / (6 * (var - (l + 1) ** 2))
    reach = int(l.max()) + 1
    distance = torch.arange(-reach, reach + 1, dtype=torch.float64).abs()[None]
    l, a = l[:, None], a[:, None]
    taps = torch.where(distance <= l, 1.0, torch.where(distance == l + 1, a, 0.0))
    return (taps / (2 * l + 1 + 2 * a)).float()


def gaussian_blur(x, sigma):
    """PIL's GaussianBlur(radius=sigma) for each image of x; sigma is a CPU tensor [N]."""
    return box_blur(x, to_device(pil_box_blur_kernels(sigma), x.device))


def box_blur(x, kernels):
    """Three passes of each image's 1-D kernel along each axis, edges replicated at every pass, as PIL.

    One pass along an axis of length L is an [L, L] matrix (edge replication folds
    the out-of-range taps onto the first and last pixels); three passes are its cube,
    and the blur is M_h @ x @ M_w^T: two batched matmuls, faster than grouped
    convolutions on CPU and GPU alike. PIL also rounds to uint8 after each of its
    six passes; we don't, so results differ from PIL's by a few 1/255 steps at most.
    """
    n, _, h, w = x.shape
    rows = _three_pass_matrix(kernels, h)
    cols = rows if w == h else _three_pass_matrix(kernels, w)
    return rows[:, None] @ x @ cols.transpose(1, 2)[:, None]


def _three_pass_matrix(kernels, length):
    n, taps = kernels.shape
    reach = (taps - 1) // 2
    offsets = torch.arange(taps, device=kernels.device) - reach
    sources = (torch.arange(length, device=kernels.device)[:, None] + offsets).clamp(0, length - 1)
    one_pass = kernels.new_zeros(n, length, length).scatter_add_(
        2, sources.expand(n, length, taps), kernels[:, None, :].expand(n, length, taps))
    return one_pass @ one_pass @ one_pass


def _apply_where(x, mask, op, *per_image_args):
    """x[mask] = op(x[mask], *args[mask]), computing op only on the chosen images."""
    chosen = mask.nonzero()[:, 0]
    if len(chosen):
        on_device = to_device(chosen, x.device)
        x[on_device] = op(x[on_device], *(to_device(arg[chosen], x.device) for arg in per_image_args))
    return x


def augment_view(x, draws, params):
    """Flip, colour jitter, grayscale, blur and solarize a batch of crops in place, as `draws` says."""
    x = _apply_where(x, draws.flip, lambda v: v.flip(-1))
    strengths = (params.brightness, params.contrast, params.saturation, params.hue)
    for step in range(4):
        for op_index, (op, strength) in enumerate(zip(JITTER_OPS, strengths)):
            if strength > 0:  # a zero strength is ColorJitter's "off"
                mask = draws.jitter & (draws.jitter_order[:, step] == op_index)
                x = _apply_where(x, mask, op, draws.jitter_factors[:, op_index])
    x = _apply_where(x, draws.grayscale, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    # kernels built on the CPU from the CPU draws: no device sync
    x = _apply_where(x, draws.blur, box_blur, pil_box_blur_kernels(draws.blur_sigma))
    return _apply_where(x, draws.solarize, solarize)


def normalize(x, mean, std, dtype=torch.float32):
    mean, std = channel_constants(mean, x), channel_constants(std, x)
    return ((x - mean) / std).to(dtype)


# ---------------------------------------------------------------- views of a batch

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


def view_specs(n_local_crops, global_size, local_size, params):
    """(output size, scale range, blur probability, solarize probability) of each view, in the official order."""
    specs = [(global_size, params.global_scale, params.blur_p[0], params.solarize_p[0]),
             (global_size, params.global_scale, params.blur_p[1], params.solarize_p[1])]
    return specs + [(local_size, params.local_scale, params.blur_p[2], params.solarize_p[2])] * n_local_crops


def draw_views(sizes, generator, *, n_local_crops, global_size, local_size, params):
    """Every random choice for a batch, view by view in the official order, from one CPU generator:
    the same seed gives the same boxes and choices on every device and code path."""
    return [draw_view(sizes, scale, blur_p, solarize_p, params, generator)
            for _, scale, blur_p, solarize_p in view_specs(n_local_crops, global_size, local_size, params)]


def _cat_draws(draws):
    return ViewDraws(*(torch.cat([getattr(d, f.name) for d in draws]) for f in dataclasses.fields(ViewDraws)))


def multicrop(canvases, sizes, generator, *, n_local_crops=8, global_size=224, local_size=96,
              params=None, device="cpu", dtype=torch.float32, batched_resize=None):
    """DINO's views of a batch of decoded images: [global1, global2, local1, ..., localN].

    canvases: uint8 [B, max_h, max_w, 3] with image i in its top-left sizes[i] = (h, w),
    on any device; sizes: long [B, 2] on the CPU. Returns normalised `dtype` tensors
    [B, 3, s, s] on `device`. batched_resize (default: on GPUs) resamples the crops of
    a size together (resized_crops_matmul) and augments them together; otherwise each
    crop is its own F.interpolate, the float reference of the OpenCV path (cpu_crops.py).
    """
    params = augment_params(params)
    device = torch.device(device)
    specs = view_specs(n_local_crops, global_size, local_size, params)
    draws = draw_views(sizes, generator, n_local_crops=n_local_crops, global_size=global_size,
                       local_size=local_size, params=params)
    canvases = canvases.to(device, non_blocking=True)
    batch = len(sizes)
    if batched_resize is None:
        batched_resize = device.type == "cuda"
    if batched_resize:
        # integers 0..255 are exact in half, and GPU matmuls accumulate in fp32
        pixels = canvases.half() if device.type == "cuda" else canvases.float()
        groups = []
        for size in dict.fromkeys(spec[0] for spec in specs):  # globals, then locals (if another size)
            members = [v for v, spec in enumerate(specs) if spec[0] == size]
            boxes = torch.stack([draws[v].boxes for v in members])
            crops = resized_crops_matmul(pixels, boxes, size).clamp_(0, 255).div_(255)
            groups.append((members, crops))
    else:
        views = resized_crops(canvases, sizes, [d.boxes for d in draws], [spec[0] for spec in specs])
        groups = [([v], view) for v, view in enumerate(views)]
    out = [None] * len(specs)
    for members, crops in groups:
        crops = normalize(augment_view(crops, _cat_draws([draws[v] for v in members]), params),
                          params.mean, params.std, dtype)
        for k, v in enumerate(members):
            out[v] = crops[k * batch: (k + 1) * batch]
    return out


def center_crops(canvases, sizes, size, device="cpu", dtype=torch.float32):
    """The evaluation view: short side resized to size * 256 / 224 (bicubic, antialiased), central
    size x size crop, ImageNet normalisation, as torchvision's Resize(256) + CenterCrop(224)."""
    canvases = canvases.to(device, non_blocking=True)
    out = canvases.new_empty((len(sizes), 3, size, size), dtype=torch.float32)
    short_side = int(size * 256 / 224)
    for i, (height, width) in enumerate(sizes.tolist()):
        if height <= width:
            new_h, new_w = short_side, int(short_side * width / height)
        else:
            new_h, new_w = int(short_side * height / width), short_side
        image = resize(canvases[i, :height, :width].permute(2, 0, 1)[None], (new_h, new_w))
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        out[i] = image[0, :, top: top + size, left: left + size]
    return normalize(out.clamp_(0, 255).div_(255), IMAGENET_MEAN, IMAGENET_STD, dtype)
