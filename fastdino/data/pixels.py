"""Float pixel ops of the DINO augmentations, on batches [N, 3, H, W] in [0, 1] on any device.

What the official PIL pipeline does to a crop (torchvision's ColorJitter parts,
RandomGrayscale, PIL's GaussianBlur, ImageOps.solarize, Normalize), as torch ops
on float pixels: nothing is rounded to uint8 between steps, as PIL does. Each
op takes per-image parameters (CPU tensors [N] from the recipe's draws), so a
batch of crops is one call. The OpenCV uint8 twins are in cpu_crops.py.
"""
import torch

# PIL's "L" conversion (ITU-R 601-2 luma), which the official PIL pipeline used for
# grayscale, contrast and saturation.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_device(tensor, device):
    """`tensor` on `device` without a host sync (a blocking copy to a GPU would wait for all queued GPU
    work). A CPU tensor bound for a GPU is first copied into a pinned (page-locked) buffer from torch's
    caching host allocator, which hands the buffer out again once the asynchronous copy has read it:
    copies from pageable memory are staged through the driver's own buffer, block the host and run
    at a fraction of the speed."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)
    return tensor.to(device, non_blocking=True)


def channel_constants(values, like):
    return to_device(torch.tensor(values, dtype=like.dtype), like.device).view(1, 3, 1, 1)


# ---------------------------------------------------------------- colour

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


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ViewDraws.jitter_factors' order


def solarize(x):
    """PIL ImageOps.solarize(threshold=128): values >= 128/255 are inverted."""
    return torch.where(x >= 128 / 255, 1 - x, x)


def normalize(x, mean, std, dtype=torch.float32):
    mean, std = channel_constants(mean, x), channel_constants(std, x)
    return ((x - mean) / std).to(dtype)


# ---------------------------------------------------------------- PIL's Gaussian blur

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
