"""Few-shot semantic segmentation by patch-feature nearest neighbours (`fastdino eval segment`).

No parameter is trained (the evaluation of Vanyan et al. 2024, "Analyzing local representations
of self-supervised vision transformers", arXiv 2401.00463, and the dense nearest-neighbour
retrieval of Balazevic et al. 2023, "Towards in-context scene understanding" / Hummingbird):

1. Memory: the last block's patch tokens (after the final norm) of N labelled images, each with
   the label distribution of the pixels it covers (255 = ignore left out; patches without a
   labelled pixel are left out of the memory).
2. Each query patch takes its k most cosine-similar memory patches; neighbour j weighs
   exp(sim_j / T) (normalised over the k, as official DINO's k-NN weighs its votes) and the
   patch's class scores are the weighted mean of the neighbours' label distributions.
3. The scores are upsampled bilinearly to the mask's own resolution, each pixel takes its
   best-scoring class, and a confusion matrix over the whole query set gives the mean IoU.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fastdino.eval.command import save_figure
from fastdino.eval.segmentation_data import IGNORE_LABEL

# Similarity entries one search step may hold (256 MiB of fp32): bounds the memory of a search
# over any number of memory patches.
SIMILARITY_BUDGET = 2**26
FIGURE_IMAGES = 4
OVERLAY_ALPHA = 0.55


@torch.no_grad()
def nearest_neighbours(queries: torch.Tensor, memory: torch.Tensor, k: int,
                       budget: int = SIMILARITY_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest dot products of each query with the memory rows: (similarities `[Q, k]`
    sorted descending, memory indices `[Q, k]` long), on the inputs' device.

    With L2-normalised rows the dot products are cosine similarities. The search walks the
    memory in chunks and merges each chunk's top-k into a running top-k, so it never holds more
    than about `budget` similarities at once, whatever the memory size. Raises ValueError when
    k is not in [1, memory rows].
    """
    if not 1 <= k <= len(memory):
        raise ValueError(f"k = {k} neighbours, but the memory holds {len(memory)} patches")
    # Memory chunks small enough that a query chunk still has at least 64 rows for the matmul.
    memory_chunk = min(len(memory), max(k, budget // 64))
    query_chunk = max(1, budget // memory_chunk)
    all_sims, all_idx = [], []
    for q0 in range(0, len(queries), query_chunk):
        query = queries[q0:q0 + query_chunk]
        best_sims = query.new_full((len(query), 0), float("-inf"))
        best_idx = torch.empty((len(query), 0), dtype=torch.long, device=query.device)
        for m0 in range(0, len(memory), memory_chunk):
            sims, idx = (query @ memory[m0:m0 + memory_chunk].T).topk(min(k, len(memory) - m0), dim=1)
            merged_sims, order = torch.cat((best_sims, sims), dim=1).topk(
                min(k, best_sims.shape[1] + sims.shape[1]), dim=1)
            best_idx = torch.cat((best_idx, idx + m0), dim=1).gather(1, order)
            best_sims = merged_sims
        all_sims.append(best_sims)
        all_idx.append(best_idx)
    return torch.cat(all_sims), torch.cat(all_idx)


@torch.no_grad()
def transfer_labels(queries: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor, k: int = 10,
                    temperature: float = 0.07, budget: int = SIMILARITY_BUDGET) -> torch.Tensor:
    """Class scores `[Q, C]` of query patches `[Q, D]` from a labelled memory (`[M, D]` features,
    `[M, C]` label distributions): the temperature-weighted vote of each query's k nearest
    memory rows, sum_j softmax(sim / T)_j * labels_j, so each row of scores sums to what the
    neighbours' label rows sum to (1 for distributions).

    Features must be L2-normalised (cosine similarity). k is clipped to the memory size. The
    weights exp(sim_j / T) are those of official DINO's `eval_knn.py`, normalised over the k
    neighbours (a softmax, as Hummingbird's attention readout) so that scores of different
    patches are comparable when upsampled together.
    """
    k = min(k, len(memory))
    scores = []
    query_chunk = max(1, budget // max(1, k * memory_labels.shape[1]))
    for q0 in range(0, len(queries), query_chunk):
        sims, idx = nearest_neighbours(queries[q0:q0 + query_chunk], memory, k, budget)
        weights = torch.softmax(sims / temperature, dim=1)
        scores.append(torch.einsum("qk,qkc->qc", weights, memory_labels[idx]))
    return torch.cat(scores)


def upsample_scores(scores: torch.Tensor, mask_hw: tuple[int, int], resized_hw: tuple[int, int],
                    patch_size: int) -> torch.Tensor:
    """Patch-grid scores `[C, h, w]` bilinearly interpolated at the centres of the mask's pixels:
    `[C, H, W]` for a mask of `mask_hw`, whose image was resized to `resized_hw` and cut to
    whole patches (`resize_to_patches`).

    Patch values sit at the patch centres. Pixels beyond the outermost centres (the image
    borders, and the strip of less than a patch that the cut removed) take the nearest border
    patch's value (grid_sample's border padding).
    """
    from fastdino.eval.segmentation_data import patch_positions

    grid_h, grid_w = scores.shape[-2:]
    ys = torch.as_tensor(patch_positions(mask_hw[0], resized_hw[0], patch_size), dtype=scores.dtype)
    xs = torch.as_tensor(patch_positions(mask_hw[1], resized_hw[1], patch_size), dtype=scores.dtype)
    # align_corners=False: normalised coordinate 2 * x / w - 1 is position x (in patches) of a w-patch grid.
    grid = torch.stack(torch.broadcast_tensors((2 * xs / grid_w - 1)[None, :], (2 * ys / grid_h - 1)[:, None]),
                       dim=-1).to(scores.device)
    return F.grid_sample(scores[None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_LABEL) -> torch.Tensor:
    """int64 `[C, C]` counts of pixels of ground-truth class i (row) predicted as class j
    (column), over the pixels whose target is not `ignore_index`; sum these over images.

    `prediction` and `target` are integer tensors of one shape on one device. Raises
    ValueError for a target or prediction label outside [0, C) other than the ignored one.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    valid = target != ignore_index
    target, prediction = target[valid].long(), prediction[valid].long()
    for name, labels in (("target", target), ("prediction", prediction)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} label {int(labels.max())} is outside the {num_classes} classes")
    return torch.bincount(target * num_classes + prediction, minlength=num_classes**2).reshape(num_classes,
                                                                                              num_classes)


def mean_iou(confusion) -> dict:
    """Scores of a summed confusion matrix (rows ground truth, columns prediction), as fractions:
    `iou` per class (float64 `[C]`, NaN for a class neither in the ground truth nor predicted
    anywhere, which the mean leaves out, as mmseg's nan-mean does), `miou` (their mean over the
    other classes), `pixel_accuracy` and `classes` (how many classes the mean is over). With no
    pixel counted, every value is NaN and `classes` 0.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
    present = ~np.isnan(iou)
    total = confusion.sum()
    return {"iou": iou, "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(true_positive.sum() / total) if total else float("nan"),
            "classes": int(present.sum())}


def few_shot_split(data, shots: int | str, train_split: str | None = None,
                   val_split: str | None = None) -> tuple[list[str], list[str]]:
    """(memory ids, query ids) of a `SegmentationData`.

    The memory is the first `shots` ids (or `"all"`) of the train split: for VOC `train_split`
    (default "train"), in the split file's order; for pairs `train_split` if given, else
    `train.txt` and `val.txt` where the folder has both, else every name sorted. The queries are
    `val_split` (VOC default "val"); for pairs without one, every name that is not in the train
    split (without a train split: not in the memory). Memory and queries that share images are
    said on stderr (a score on images the memory holds is not few-shot). Raises
    ValueError when the split holds fewer than `shots` images, when pairs without a train split
    are asked for all shots, or when no query image is left.
    """
    if data.layout == "voc":
        train_split, val_split = train_split or "train", val_split or "val"
    elif train_split is None and val_split is None and all((data.root / f"{n}.txt").is_file() for n in ("train", "val")):
        train_split, val_split = "train", "val"  # a pairs folder with split files (as `fastdino data scenes` writes)
    if data.layout == "pairs" and train_split is None and shots == "all":
        raise ValueError("--shots all needs a train split for the pairs layout (--train-split FILE), else no "
                         "image is left to evaluate")
    pool = data.ids(train_split)
    if shots != "all" and shots > len(pool):
        raise ValueError(f"--shots {shots}, but the train split ({train_split or 'every image'}) has only "
                         f"{len(pool)} images")
    memory = pool if shots == "all" else pool[:shots]
    if val_split is not None:
        queries = data.ids(val_split)
    else:
        taken = set(pool if train_split is not None else memory)
        queries = [i for i in data.ids() if i not in taken]
    if not queries:
        raise ValueError(f"no image is left to evaluate in {data.root}: the {len(memory)} memory images are all of "
                         f"them; give fewer --shots or a --val-split")
    shared = len(set(memory) & set(queries))
    if shared:
        print(f"warning: {shared} of the {len(queries)} query images are in the memory too", file=sys.stderr)
    return memory, queries


def voc_palette(num_colours: int = 256) -> np.ndarray:
    """uint8 `[num_colours, 3]`: the Pascal VOC label colours (the devkit's `labelcolormap`)."""
    palette = np.zeros((num_colours, 3), dtype=np.uint8)
    for label in range(num_colours):
        value, r, g, b = label, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[label] = (r, g, b)
    return palette


def label_overlay(labels: np.ndarray) -> np.ndarray:
    """float RGBA `[H, W, 4]` drawing each class in its VOC colour over an image; background (0)
    is left clear and ignore (255) pixels whitened."""
    palette = voc_palette()
    rgba = np.zeros((*labels.shape, 4))
    rgba[..., :3] = palette[labels] / 255.0
    rgba[..., 3] = np.where((labels != 0) & (labels != IGNORE_LABEL), OVERLAY_ALPHA, 0.0)
    rgba[labels == IGNORE_LABEL] = (1.0, 1.0, 1.0, 0.7)
    return rgba


def save_segmentation_figure(samples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
                             class_names: Sequence[str], path: str | Path, title: str) -> Path:
    """One PNG with a row per `(id, uint8 image [H, W, 3], ground truth [H, W], prediction [H, W])`:
    the image, the ground truth and the prediction drawn over it in VOC colours (ignore
    whitened), and a legend of the classes shown."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch


    palette = voc_palette()
    fig = Figure(figsize=(9, 2.8 * len(samples) + 0.8), layout="constrained")
    axes = fig.subplots(len(samples), 3, squeeze=False)
    shown = set()
    for row, (image_id, image, target, prediction) in zip(axes, samples):
        valid = target != IGNORE_LABEL
        accuracy = float((prediction[valid] == target[valid]).mean()) if valid.any() else float("nan")
        for ax, labels, name in zip(row, (None, target, prediction),
                                    (image_id, "ground truth", f"prediction ({100 * accuracy:.0f}% pixel accuracy)")):
            ax.imshow(image)
            if labels is not None:
                ax.imshow(label_overlay(labels), interpolation="nearest")
                shown.update(int(c) for c in np.unique(labels) if c not in (0, IGNORE_LABEL))
            ax.set_title(name, fontsize=10)
            ax.set_axis_off()
    handles = [Patch(color=palette[c] / 255.0, label=class_names[c]) for c in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=9)
    fig.suptitle(title, fontsize=12)
    return save_figure(fig, path, dpi=90)


def shots_value(text: str) -> int | str:
    """argparse type of --shots: a positive number of images or "all"."""
    if text == "all":
        return text
    try:
        shots = int(text)
    except ValueError:
        shots = 0
    if shots < 1:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive number of images or 'all', got {text!r}")
    return shots


def build_parser():
    from fastdino.eval.command import add_run_arguments, add_weights_arguments, command_parser

    parser = command_parser(
        "segment",
        "Few-shot semantic segmentation by patch-feature nearest neighbours, no training (Vanyan et al. 2024, "
        "arXiv 2401.00463; Hummingbird's dense NN retrieval, Balazevic et al. 2023).\n\n"
        "A memory holds the last block's patch tokens of --shots labelled images, each with the label distribution "
        "of the pixels it covers (255 = ignore left out). Each query patch takes its --k most cosine-similar memory "
        "patches, weighted exp(sim / T) normalised over the k; the class scores are upsampled bilinearly to the "
        "mask's resolution and each pixel takes its best class. Prints the mean IoU over the classes that are in "
        "the ground truth or the prediction, the pixel accuracy, and writes per-class IoU with --json.\n\n"
        "Images: the shorter side resized to --size, the bottom/right cut to whole patches (less than one patch; "
        "those pixels take the nearest patch's scores).\n"
        "Data: a Pascal VOC folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt) or a "
        "pairs folder (images/<name>.jpg|png, masks/<name>.png); labels 0 = background, 255 = ignore, names from "
        "labels.txt, else VOC's.")
    add_weights_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DIR", help="VOC or pairs folder")
    parser.add_argument("--shots", type=shots_value, default=5, metavar="N|all",
                        help="labelled images in the memory: the first N of the train split, or all of it (default 5)")
    parser.add_argument("--train-split", metavar="NAME|FILE",
                        help="memory images: a split name (VOC: ImageSets/Segmentation/NAME.txt, pairs: DIR/NAME.txt) "
                             "or a file of ids (default: VOC 'train'; pairs: every name, sorted)")
    parser.add_argument("--val-split", metavar="NAME|FILE",
                        help="query images, as --train-split (default: VOC 'val'; pairs: the names not in the train "
                             "split, or without one not in the memory)")
    parser.add_argument("--max-images", type=int, default=0, metavar="N",
                        help="evaluate only the first N query images (default 0: all)")
    parser.add_argument("--k", type=int, default=10,
                        help="neighbours per query patch (default 10: a 1-shot memory holds only a few hundred "
                             "patches, and more neighbours than an object's patches drown small objects)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="vote weights exp(sim / T) (default 0.07, as official k-NN)")
    parser.add_argument("--size", type=int, default=0,
                        help="shorter image side (default: the run's eval.eval_size, else the model's img_size)")
    parser.add_argument("--png", metavar="FILE",
                        help=f"draw the first {FIGURE_IMAGES} query images with ground truth and prediction here "
                             f"(default: the --json path with .png, when --json is given)")
    add_run_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino eval segment ...`: prints the mIoU line, writes --json and the PNG."""
    from tqdm import tqdm

    from fastdino.api import extract_features
    from fastdino.eval.knn import low_variance_dimensions
    from fastdino.eval.command import eval_backbone, eval_device, write_json
    from fastdino.eval.segmentation_data import open_segmentation_data, patch_label_distribution, resize_to_patches

    args = build_parser().parse_args(argv)
    if args.k < 1 or args.temperature <= 0 or args.max_images < 0 or args.drop_high_variance < 0:
        raise ValueError("--k must be at least 1, --temperature positive, --max-images and --drop-high-variance "
                         "not negative")
    data = open_segmentation_data(args.data)
    memory_ids, query_ids = few_shot_split(data, args.shots, args.train_split, args.val_split)
    if args.max_images:
        query_ids = query_ids[:args.max_images]
    device = eval_device(args.device)
    backbone, arch, size = eval_backbone(args, device)
    patch = backbone.patch_embed.patch_size
    num_classes = data.num_classes

    def patch_tokens(image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """(raw patch tokens [h * w, D] on the device, resized size, grid size)."""
        pixels, resized_hw = resize_to_patches(image, size, patch)
        batch = torch.from_numpy(pixels).permute(2, 0, 1)[None]
        tokens = extract_features(backbone, batch, device=device)["patch"][0].to(device)
        return tokens, resized_hw, (pixels.shape[0] // patch, pixels.shape[1] // patch)

    memory_features, memory_labels = [], []
    for image_id in tqdm(memory_ids, desc="memory", dynamic_ncols=True, leave=False):
        image, mask = data.read(image_id)
        tokens, resized_hw, _ = patch_tokens(image)
        labels = torch.from_numpy(patch_label_distribution(mask, resized_hw, patch, num_classes)).to(device)
        labelled = labels.sum(dim=1) > 0
        memory_features.append(tokens[labelled])
        memory_labels.append(labels[labelled])
    memory = torch.cat(memory_features)
    memory_labels = torch.cat(memory_labels)
    if not len(memory):
        raise ValueError(f"the {len(memory_ids)} memory images have no labelled pixel (all 255): nothing to "
                         f"transfer labels from")
    if args.drop_high_variance >= memory.shape[1]:
        raise ValueError(f"--drop-high-variance {args.drop_high_variance} leaves none of the "
                         f"{memory.shape[1]} feature dimensions")
    # On the raw tokens (before normalising), and the same dimensions kept for the queries.
    keep = low_variance_dimensions(memory, args.drop_high_variance)
    memory = F.normalize(memory[:, keep], dim=1)

    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    samples = []
    for image_id in tqdm(query_ids, desc="queries", dynamic_ncols=True, leave=False):
        image, mask = data.read(image_id)
        tokens, resized_hw, grid_hw = patch_tokens(image)
        scores = transfer_labels(F.normalize(tokens[:, keep], dim=1), memory, memory_labels, args.k,
                                 args.temperature)
        scores = upsample_scores(scores.T.reshape(num_classes, *grid_hw), mask.shape, resized_hw, patch)
        prediction = scores.argmax(dim=0)
        target = torch.from_numpy(mask).to(device)
        confusion += confusion_matrix(prediction, target, num_classes)
        if len(samples) < FIGURE_IMAGES:
            samples.append((image_id, image, mask, prediction.cpu().numpy().astype(np.uint8)))

    scores = mean_iou(confusion.cpu().numpy())
    if not scores["classes"]:
        raise ValueError(f"every pixel of the {len(query_ids)} query masks is 255 (ignore): nothing to score")
    shots_name = "all-shot" if args.shots == "all" else f"{args.shots}-shot"
    print(f"{args.which} {shots_name} segmentation: mIoU {100 * scores['miou']:.1f}% over {scores['classes']} "
          f"classes ({len(query_ids)} images), pixel accuracy {100 * scores['pixel_accuracy']:.1f}%")
    results = {
        "miou": 100 * scores["miou"], "pixel_accuracy": 100 * scores["pixel_accuracy"],
        "per_class_iou": {name: None if np.isnan(iou) else 100 * float(iou)
                          for name, iou in zip(data.class_names, scores["iou"])},
        "classes_evaluated": scores["classes"], "images": len(query_ids), "shots": args.shots,
        "memory_images": len(memory_ids), "memory_patches": len(memory), "k": args.k,
        "temperature": args.temperature, "size": size, "drop_high_variance": args.drop_high_variance,
        "data": str(data.root), "layout": data.layout, "checkpoint": str(args.checkpoint), "which": args.which,
        "arch": arch, "patch_size": patch,
    }
    write_json(args.json, results)
    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    if png:
        title = (f"{args.which} {arch}/{patch}, {shots_name} (k={args.k}, T={args.temperature}): "
                 f"mIoU {100 * scores['miou']:.1f}% over {len(query_ids)} images")
        save_segmentation_figure(samples, data.class_names, png, title)
        print(f"wrote {png}", file=sys.stderr)
    return 0
