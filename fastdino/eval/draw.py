"""Attention-map pictures for image files or arrays (used by `fastdino viz attention` and the demo)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdino.data.images import load_rgb
from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from fastdino.eval.attention_maps import (last_attention_maps, patch_pca_rgb, save_attention_figure,
                                          threshold_attention)


MAX_SIZE = 1024  # at patch 8, 16k tokens: the last block's attention alone is ~1 GB per head


def load_image(path: str | Path) -> np.ndarray:
    """uint8 `[H, W, 3]` of an image file, read as `data convert` reads it (fastdino.data.images.load_rgb).
    Raises FileNotFoundError, or ValueError for a file that is not a readable image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        return load_rgb(path)
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        raise ValueError(f"cannot read image {path}: {exc}") from None


def prepare(image: np.ndarray, size: int, patch_size: int) -> tuple[np.ndarray, torch.Tensor]:
    """Shorter side to `size`, then cropped to a multiple of the patch; returns (uint8 HWC, normalised CHW)."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    resized = Image.fromarray(image).resize((max(patch_size, round(width * scale)), max(patch_size, round(height * scale))),
                                            Image.BICUBIC)
    pixels = np.asarray(resized)
    pixels = pixels[: pixels.shape[0] // patch_size * patch_size, : pixels.shape[1] // patch_size * patch_size]
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels, (tensor - mean) / std


@torch.no_grad()
def draw_attention(backbone, patch_size: int, image: np.ndarray, path: Path, size: int, title: str) -> Path:
    pixels, tensor = prepare(image, size, patch_size)
    device = next(backbone.parameters()).device
    tensor = tensor.to(device)
    maps = last_attention_maps(backbone, tensor, patch_size).float().cpu()
    masks = threshold_attention(maps, keep_mass=0.6)
    pca = patch_pca_rgb(backbone, tensor, patch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_attention_figure(pixels, maps.numpy(), masks.numpy() if torch.is_tensor(masks) else masks, path,
                          title=title, pca_rgb=pca.cpu().numpy() if torch.is_tensor(pca) else pca)
    return path


def draw_attention_for_files(backbone, patch_size: int, image_paths: list[str], out_dir: Path,
                             size: int = 224) -> list[Path]:
    """One picture per image file, `out_dir/attention_<name>.png`; returns their paths. Every file
    is checked before anything is drawn (FileNotFoundError names the first missing one,
    IsADirectoryError a folder; ValueError for a `size` outside 2 patches to MAX_SIZE). Files
    of the same name from different folders (IMG_0001.JPG twice) get the folders in their
    picture's name, so none overwrites another."""
    if not 2 * patch_size <= size <= MAX_SIZE:  # the PCA picture needs 3 patches
        raise ValueError(f"--size {size}: give {2 * patch_size} to {MAX_SIZE} px (at least 2 patches of "
                         f"{patch_size} px on the shorter side)")
    paths = [Path(p) for p in image_paths]
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise IsADirectoryError(f"{folders[0]} is a folder: give image files (e.g. {folders[0]}/*.jpg)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                     if len(missing) > 1 else ""))
    names = picture_names(paths)
    return [draw_attention(backbone, patch_size, load_image(path), out_dir / f"attention_{name}.png", size, title=name)
            for path, name in zip(paths, names)]


def picture_names(paths: list[Path]) -> list[str]:
    """A distinct name per path: its stem, preceded by as many parent folders (joined by "_") as
    it takes to tell it from the other paths, and a counter for the same file given twice."""
    def key(path: Path, depth: int) -> tuple[str, ...]:
        folders = [part for part in path.parent.parts if part not in ("/", "\\")]
        return (*folders[len(folders) - depth:], path.stem) if depth else (path.stem,)

    names: list[str] = []
    seen: dict[str, int] = {}
    for i, path in enumerate(paths):
        depth = 0
        while depth < len(path.parent.parts) and any(key(other, depth) == key(path, depth)
                                                     for j, other in enumerate(paths) if j != i):
            depth += 1
        name = "_".join(key(path, depth))
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names
