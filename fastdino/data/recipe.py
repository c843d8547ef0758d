"""The DINO view recipe: which views an image gets, and every random choice behind them.

The views and their order are the official `DataAugmentationDINO`'s: two global
crops then N local crops, each RandomResizedCrop (bicubic, antialiased) ->
horizontal flip -> colour jitter (its four parts in a random order) -> grayscale
-> Gaussian blur -> solarize -> normalise. A `ViewRecipe` holds those settings,
made once per loader; `ViewRecipe.draw` makes every random choice of a batch up
front on the CPU from one torch.Generator, in torchvision's order, so a seed gives
the same boxes and choices on any device and in either backend that computes the
pixels (multicrop.py: torch ops on the images' device; cpu_crops.py: OpenCV uint8).
The augmentation settings and their defaults are the config's
`fastdino.config.AugmentConfig` (data.augment), their one home.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf

from fastdino.config import AugmentConfig


def augment_config(augment=None) -> AugmentConfig:
    """A new AugmentConfig, sequences as tuples, from None (the official defaults, AugmentConfig()) or
    overrides of some keys in a mapping, OmegaConf node or dataclass; an unknown key is a ValueError."""
    if augment is None:
        values = {}
    elif OmegaConf.is_config(augment):
        values = OmegaConf.to_container(augment, resolve=True)
    elif dataclasses.is_dataclass(augment):
        values = dataclasses.asdict(augment)
    else:
        values = dict(augment)
    known = {f.name for f in dataclasses.fields(AugmentConfig)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"unknown augment keys {unknown}; known: {sorted(known)}")
    values = {**dataclasses.asdict(AugmentConfig()), **values}
    return AugmentConfig(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})


@dataclass(frozen=True)
class ViewSpec:
    """One view: output side in pixels, RandomResizedCrop area-fraction range, blur and solarize probabilities."""
    size: int
    scale: tuple
    blur_p: float
    solarize_p: float


@dataclass(frozen=True)
class ViewRecipe:
    """DINO's views of an image: 2 global crops of global_size px, then n_local_crops local crops of
    local_size px, augmented as `augment` says (anything `augment_config` takes; None: the defaults).

    Made once per loader, kept whole: `augment` becomes an AugmentConfig of the recipe's own (tuples,
    not the caller's lists), and `views` (one ViewSpec per view, in the official order) is derived
    from the settings here, not per batch.
    """
    n_local_crops: int = 8
    global_size: int = 224
    local_size: int = 96
    augment: AugmentConfig | None = None
    views: tuple = field(init=False, repr=False)

    def __post_init__(self):
        augment = augment_config(self.augment)
        global_views = [ViewSpec(self.global_size, augment.global_scale, augment.blur_p[i], augment.solarize_p[i])
                        for i in (0, 1)]
        local_view = ViewSpec(self.local_size, augment.local_scale, augment.blur_p[2], augment.solarize_p[2])
        object.__setattr__(self, "augment", augment)
        object.__setattr__(self, "views", (*global_views, *[local_view] * self.n_local_crops))

    @property
    def jitter_strengths(self):
        """ColorJitter's (brightness, contrast, saturation, hue), in the order of `ViewDraws.jitter_factors`."""
        augment = self.augment
        return augment.brightness, augment.contrast, augment.saturation, augment.hue

    def draw(self, sizes, generator):
        """Every random choice for a batch of images of `sizes` (long [B, 2] as h, w): one ViewDraws per
        view, view by view in the official order, from one CPU generator."""
        return [draw_view(sizes, view, self.augment, generator) for view in self.views]


def seeded_generator(*keys, device: str | torch.device = "cpu"):
    """A torch.Generator on `device` whose stream is a function of the non-negative ints `keys`
    alone: the loaders seed batch b of epoch e on rank r with (seed, e, b, r)."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


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


def draw_view(sizes, view, augment, generator):
    """Draws the choices of `view` (a ViewSpec) for images of `sizes` (long [B, 2] as h, w), as torchvision would."""
    n = len(sizes)

    def coin(p):
        return torch.rand(n, generator=generator) < p

    def factor_range(strength):  # ColorJitter's [max(0, 1 - s), 1 + s]
        return max(0.0, 1 - strength), 1 + strength

    boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], view.scale, augment.ratio, generator)
    flip = coin(augment.flip_p)
    jitter = coin(augment.color_jitter_p)
    jitter_factors = torch.stack([
        _uniform(n, *factor_range(augment.brightness), generator),
        _uniform(n, *factor_range(augment.contrast), generator),
        _uniform(n, *factor_range(augment.saturation), generator),
        _uniform(n, -augment.hue, augment.hue, generator),
    ], dim=1)
    jitter_order = torch.rand(n, 4, generator=generator).argsort(dim=1)
    grayscale = coin(augment.grayscale_p)
    blur = coin(view.blur_p)
    blur_sigma = _uniform(n, augment.blur_sigma[0], augment.blur_sigma[1], generator)
    solarize = coin(view.solarize_p)
    return ViewDraws(boxes, flip, jitter, jitter_factors, jitter_order, grayscale, blur, blur_sigma, solarize)
