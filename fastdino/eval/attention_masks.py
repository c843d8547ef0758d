"""How well the last block's CLS attention outlines objects (`fastdino eval attention-masks`).

DINO (Caron et al. 2021, Sec. 4.2, Fig. 4) compares masks made from the self-attention maps with
the PASCAL VOC12 val masks by the Jaccard index: each head's CLS attention of the last block is
thresholded to keep `keep_mass` (60 %) of its mass, as the official `visualize_attention.py`
does (`fastdino.eval.attention_maps.threshold_attention`), upsampled to the image with nearest
neighbours as there, and compared with the foreground (every label but background and ignore).
Reported per head (averaged over images), for the best head and averaged over heads.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fastdino.eval.command import save_figure
from fastdino.eval.segmentation_data import IGNORE_LABEL

FIGURE_IMAGES = 4
# RGBA overlays of a head's mask against the foreground.
BOTH, MASK_ONLY, FOREGROUND_ONLY = (0.1, 0.8, 0.1, 0.6), (0.9, 0.1, 0.1, 0.6), (0.1, 0.3, 0.9, 0.6)


def jaccard(prediction, target, valid=None) -> np.ndarray:
    """Jaccard index |P & T| / |P | T| of boolean masks over their last two axes (leading axes,
    e.g. heads, broadcast): float64 of the leading shape (a 0-d array for 2-D masks).

    Pixels where `valid` is False (VOC's 255 borders) count for neither set. Two empty masks
    score 1.0: they agree everywhere (the DAVIS convention, `db_eval_iou`).
    """
    prediction, target = np.asarray(prediction, dtype=bool), np.asarray(target, dtype=bool)
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        prediction, target = prediction & valid, target & valid
    intersection = (prediction & target).sum(axis=(-2, -1))
    union = (prediction | target).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def patch_grid_to_pixels(values: torch.Tensor | np.ndarray, mask_hw: tuple[int, int], resized_hw: tuple[int, int],
                         patch_size: int) -> np.ndarray:
    """Patch-grid values `[heads, h, w]` upsampled with nearest neighbours (as the official
    `visualize_attention.py`) to a mask of `mask_hw` whose image was resized to `resized_hw` and
    cut to whole patches (`resize_to_patches`): `[heads, H, W]` of the same dtype, each pixel
    taking the patch its centre falls in (the last patch row or column for the strip the cut
    removed)."""
    from fastdino.eval.segmentation_data import patch_positions

    values = np.asarray(values)
    grid_h, grid_w = values.shape[-2:]
    rows = np.minimum(np.floor(patch_positions(mask_hw[0], resized_hw[0], patch_size)).astype(np.int64), grid_h - 1)
    cols = np.minimum(np.floor(patch_positions(mask_hw[1], resized_hw[1], patch_size)).astype(np.int64), grid_w - 1)
    return values[:, rows][:, :, cols]


def save_attention_mask_figure(samples: list[tuple], head: int, path: str | Path, title: str) -> Path:
    """One PNG with a row per `(id, uint8 image [H, W, 3], labels [H, W], attention [heads, H, W],
    head masks bool [heads, H, W], Jaccard per head)`: the image, its foreground (ignore
    whitened), head `head`'s attention, and its mask against the foreground (green: both,
    red: mask only, blue: foreground only)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch


    fig = Figure(figsize=(11, 2.8 * len(samples) + 0.9), layout="constrained")
    axes = fig.subplots(len(samples), 4, squeeze=False)
    for row, (image_id, image, labels, attention, masks, scores) in zip(axes, samples):
        valid = labels != IGNORE_LABEL
        foreground = valid & (labels != 0)
        truth = np.zeros((*labels.shape, 4))
        truth[foreground] = (1.0, 0.8, 0.0, 0.55)
        truth[~valid] = (1.0, 1.0, 1.0, 0.7)
        against = np.zeros((*labels.shape, 4))
        against[masks[head] & foreground] = BOTH
        against[masks[head] & ~foreground & valid] = MASK_ONLY
        against[~masks[head] & foreground] = FOREGROUND_ONLY
        row[0].imshow(image)
        row[0].set_title(image_id, fontsize=10)
        row[1].imshow(image)
        row[1].imshow(truth, interpolation="nearest")
        row[1].set_title("foreground", fontsize=10)
        row[2].imshow(attention[head], cmap="inferno", interpolation="nearest")
        row[2].set_title(f"head {head} attention", fontsize=10)
        row[3].imshow(image)
        row[3].imshow(against, interpolation="nearest")
        row[3].set_title(f"head {head} mask: Jaccard {100 * scores[head]:.0f}%", fontsize=10)
        for ax in row:
            ax.set_axis_off()
    fig.legend(handles=[Patch(color=colour[:3], label=label) for colour, label in
                        ((BOTH, "mask and foreground"), (MASK_ONLY, "mask only"), (FOREGROUND_ONLY, "foreground only"))],
               loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle(title, fontsize=12)
    return save_figure(fig, path, dpi=90)


def build_parser():
    from fastdino.eval.command import add_run_arguments, add_weights_arguments, command_parser

    parser = command_parser(
        "attention-masks",
        "Jaccard similarity of the last block's CLS attention with foreground masks (DINO, Caron et al. 2021, "
        "Sec. 4.2, Fig. 4: self-attention masks against VOC12 val masks).\n\n"
        "Each head's attention from the CLS token to the patches is thresholded to keep --keep-mass of its mass "
        "(the fewest patches that hold it, as the official visualize_attention.py), upsampled to the image with "
        "nearest neighbours, and compared with the foreground: every label but background (0) and ignore (255); "
        "ignore pixels count for neither. Reports each head's Jaccard averaged over images, the best head and the "
        "mean over heads. Images without foreground are skipped and counted (a thresholded map always keeps at "
        "least one patch, so it could never match an empty foreground).\n\n"
        "Images: the shorter side resized to --size, the bottom/right cut to whole patches (as official; those "
        "pixels take the nearest patch's mask).\n"
        "Data: a Pascal VOC folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt) or a "
        "pairs folder (images/<name>.jpg|png, masks/<name>.png).")
    add_weights_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DIR", help="VOC or pairs folder")
    parser.add_argument("--split", metavar="NAME|FILE",
                        help="images to score: a split name (VOC: ImageSets/Segmentation/NAME.txt, pairs: "
                             "DIR/NAME.txt) or a file of ids (default: VOC 'val'; pairs: every image)")
    parser.add_argument("--max-images", type=int, default=0, metavar="N",
                        help="score only the first N images of the split (default 0: all)")
    parser.add_argument("--keep-mass", type=float, default=0.6,
                        help="fraction of each head's attention mass the mask keeps (default 0.6, as the paper)")
    parser.add_argument("--size", type=int, default=0,
                        help="shorter image side (default: the run's eval.eval_size, else the model's img_size)")
    parser.add_argument("--png", metavar="FILE",
                        help=f"draw the first {FIGURE_IMAGES} scored images with the best head's mask here "
                             f"(default: the --json path with .png, when --json is given)")
    add_run_arguments(parser, drop_high_variance=False)
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino eval attention-masks ...`: prints the best head's and the mean Jaccard, writes
    --json and the PNG."""
    from tqdm import tqdm

    from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
    from fastdino.eval.attention_maps import last_attention_maps, threshold_attention
    from fastdino.eval.command import eval_backbone, eval_device, write_json
    from fastdino.eval.segmentation_data import open_segmentation_data, resize_to_patches

    args = build_parser().parse_args(argv)
    if not 0 < args.keep_mass <= 1 or args.max_images < 0:
        raise ValueError("--keep-mass must be in (0, 1] and --max-images not negative")
    data = open_segmentation_data(args.data)
    split = args.split or ("val" if data.layout == "voc" else None)
    ids = data.ids(split)
    if args.max_images:
        ids = ids[:args.max_images]
    device = eval_device(args.device)
    backbone, arch, size = eval_backbone(args, device)
    patch = backbone.patch_embed.patch_size
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))

    per_image, samples, skipped = [], [], 0
    for image_id in tqdm(ids, desc="attention masks", dynamic_ncols=True, leave=False):
        image, labels = data.read(image_id)
        valid = labels != IGNORE_LABEL
        foreground = valid & (labels != 0)
        if not foreground.any():
            skipped += 1
            continue
        pixels, resized_hw = resize_to_patches(image, size, patch)
        tensor = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std
        attention = last_attention_maps(backbone, tensor, patch)
        masks = patch_grid_to_pixels(threshold_attention(attention, args.keep_mass), labels.shape, resized_hw, patch)
        scores = jaccard(masks, foreground, valid)
        per_image.append(scores)
        if len(samples) < FIGURE_IMAGES:
            samples.append((image_id, image, labels, patch_grid_to_pixels(attention, labels.shape, resized_hw, patch),
                            masks, scores))
    if not per_image:
        raise ValueError(f"none of the {len(ids)} images has a foreground pixel (labels other than 0 and 255): "
                         f"nothing to compare the attention with")
    per_head = np.mean(per_image, axis=0)
    best = int(per_head.argmax())
    print(f"{args.which} attention masks: best head {best} Jaccard {100 * per_head[best]:.1f}%, mean over "
          f"{len(per_head)} heads {100 * per_head.mean():.1f}% ({len(per_image)} images"
          f"{f', {skipped} without foreground skipped' if skipped else ''})")
    results = {
        "jaccard_per_head": [100 * float(j) for j in per_head], "best_head": best,
        "best_head_jaccard": 100 * float(per_head[best]), "mean_over_heads": 100 * float(per_head.mean()),
        "heads": len(per_head), "images": len(per_image), "skipped_empty_foreground": skipped,
        "keep_mass": args.keep_mass, "size": size, "data": str(data.root), "layout": data.layout,
        "split": split, "checkpoint": str(args.checkpoint), "which": args.which, "arch": arch, "patch_size": patch,
    }
    write_json(args.json, results)
    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    if png:
        title = (f"{args.which} {arch}/{patch}, CLS attention keeping {100 * args.keep_mass:.0f}% of its mass: "
                 f"best head {best} Jaccard {100 * per_head[best]:.1f}%, mean {100 * per_head.mean():.1f}%")
        save_attention_mask_figure(samples, best, png, title)
        print(f"wrote {png}", file=sys.stderr)
    return 0
