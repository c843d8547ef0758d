"""Look inside a ViT: last-block CLS attention per head, its top-mass masks (official
`visualize_attention.py`), a PCA colouring of the patch tokens, and one PNG of it all."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.figure import Figure
from torch import nn

from fastdino.eval.command import save_figure
from fastdino.eval.knn import eval_mode


def _crop_to_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[3, H, W]` -> `[1, 3, H', W']`, cut at the bottom/right to whole patches, as official."""
    _, H, W = image.shape
    return image[None, :, :H - H % patch_size, :W - W % patch_size]


@torch.no_grad()
def last_attention_maps(model: nn.Module, image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """How much the CLS token attends to each patch in the last block: `[heads, H/p, W/p]`.

    `image` is one normalised `[3, H, W]` tensor; each head's map sums to at most 1 (the
    CLS token's attention to itself is dropped).
    """
    image = _crop_to_patches(image, patch_size).to(next(model.parameters()).device)
    grid_h, grid_w = image.shape[-2] // patch_size, image.shape[-1] // patch_size
    with eval_mode(model):
        attn = model.get_last_selfattention(image)
    return attn[0, :, 0, 1:].float().reshape(-1, grid_h, grid_w).cpu()


def threshold_attention(maps: torch.Tensor, keep_mass: float = 0.6) -> torch.Tensor:
    """Per head, the fewest patches that hold `keep_mass` of its attention (bool, same shape)."""
    flat = maps.flatten(1)
    values, order = flat.sort(dim=1)  # ascending
    cumulative = (values / values.sum(dim=1, keepdim=True)).cumsum(dim=1)
    # Drop the weakest patches while what they hold together stays within 1 - keep_mass.
    keep_sorted = cumulative > 1 - keep_mass
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep.reshape(maps.shape)


@torch.no_grad()
def patch_pca_rgb(model: nn.Module, image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The last block's patch tokens projected on their first 3 principal components and
    min-max scaled per component: an RGB picture `[H/p, W/p, 3]` in [0, 1]."""
    image = _crop_to_patches(image, patch_size).to(next(model.parameters()).device)
    grid_h, grid_w = image.shape[-2] // patch_size, image.shape[-1] // patch_size
    with eval_mode(model):
        tokens = model.get_intermediate_layers(image, n=1)[0][0, 1:].float()
    centered = tokens - tokens.mean(dim=0)
    _, _, components = torch.linalg.svd(centered, full_matrices=False)
    projected = centered @ components[:3].T
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    rgb = (projected - low) / (high - low).clamp_min(1e-12)
    return rgb.reshape(grid_h, grid_w, 3).cpu()


def save_attention_figure(image_uint8: np.ndarray, maps, masks, path: str | Path, title: str | None = None,
                          pca_rgb=None) -> Path:
    """One PNG: top row the image and each head's attention heat map; bottom row the PCA
    picture (if given) and each head's mask outlined over the image.

    `maps` and `masks` are `[heads, h, w]` (tensors or arrays); they are stretched to the
    image size, so pass the image cropped as the model saw it.
    """
    image = np.asarray(image_uint8)
    H, W = image.shape[:2]
    maps = torch.as_tensor(np.asarray(maps), dtype=torch.float32)
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    heat = F.interpolate(maps[None], size=(H, W), mode="nearest")[0].numpy()
    masks_full = F.interpolate(masks[None], size=(H, W), mode="nearest")[0].numpy() > 0.5
    num_heads = len(heat)

    panel = 2.4  # inches per panel
    fig = Figure(figsize=(panel * (num_heads + 1), panel * 2 + (0.5 if title else 0.0)), layout="constrained")
    axes = fig.subplots(2, num_heads + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)

    axes[0, 0].imshow(image)
    axes[0, 0].set_title("input")
    if pca_rgb is not None:
        axes[1, 0].imshow(np.asarray(pca_rgb), interpolation="nearest")
        axes[1, 0].set_title("patch PCA (RGB)")
    colors = colormaps["tab10"]
    for h in range(num_heads):
        axes[0, h + 1].imshow(heat[h], cmap="inferno", interpolation="nearest")
        axes[0, h + 1].set_title(f"head {h}")
        color = colors(h % 10)
        overlay = np.zeros((H, W, 4))
        overlay[masks_full[h]] = (*color[:3], 0.45)
        axes[1, h + 1].imshow(image)
        axes[1, h + 1].imshow(overlay)
        if masks_full[h].any() and not masks_full[h].all():
            axes[1, h + 1].contour(masks_full[h], levels=[0.5], colors=[color], linewidths=1.2)
        axes[1, h + 1].set_title(f"head {h} mask")
    if title:
        fig.suptitle(title, fontsize=14)
    return save_figure(fig, path)
