"""Semi-supervised video object segmentation by label propagation of frozen patch features,
scored with the DAVIS-2017 region (J) and boundary (F) measures.

Propagation follows the DINO paper (Caron et al. 2021, Sec. 4.2.3 and Table 5, after the
protocol of Jabri et al. 2020) as the official `eval_video_segmentation.py` implements it:
every frame is resized (shorter side `size`, both sides floored to whole patches), its
last-layer patch tokens (after the final norm) are L2-normalised, and each patch of frame t
takes the `topk` most similar patches of the context (the first frame with its given mask and
the `n_last_frames` frames before t with their propagated soft labels), among those within
`size_mask_neighborhood` patches of its own position; their labels are averaged with
weights softmax(cosine / temperature). The soft labels are upsampled bilinearly by the patch
size, min-max scaled per label, and the argmax is resized (nearest) to the frame.

Scoring follows the davis2017-evaluation toolkit (Pont-Tuset et al. 2017;
github.com/davisvideochallenge/davis2017-evaluation, semi-supervised task): objects are the
ids 1..max of the first annotation; J and F are computed per object on every frame but the
first and the last; an object's score is the mean over those frames, and J-Mean, F-Mean are
means over all objects of all videos, J&F-Mean their average.
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn

from fastdino.eval.command import save_figure

# DAVIS `bound_th`: the boundary match tolerance as a fraction of the image diagonal.
BOUNDARY_TOLERANCE = 0.008
# Annotation value DAVIS reserves for void pixels; its toolkit scores them as background.
VOID_LABEL = 255
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
# Affinity entries per chunk of target patches: bounds the [patches, context patches] matrix.
AFFINITY_CHUNK = 2 ** 24
# Side, in patches, of the tiles of target patches the windowed search scores together: larger
# tiles gather fewer copies of each context patch but score more outside each patch's window
# (12 was fastest on a CPU at neighbourhood 12, 60x106 patches).
WINDOW_TILE = 12
# Gathered context features (entries of [tiles, T * keys, D]) per batch of tiles in the windowed
# search: bounds its memory.
WINDOW_CHUNK = 2 ** 24


# ---------------------------------------------------------------------------------------------
# Metrics (davis2017-evaluation davis2017/metrics.py and utils.db_statistics)

def jaccard(annotation: np.ndarray, segmentation: np.ndarray) -> float:
    """Region similarity J = |A ∩ S| / |A ∪ S| of two binary masks `[H, W]`, in [0, 1]; 1 when
    both are empty (DAVIS `db_eval_iou`). Raises ValueError when the shapes differ."""
    from fastdino.eval.attention_masks import jaccard as mask_jaccard

    return float(mask_jaccard(*_binary_pair(annotation, segmentation)))


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """The one-pixel-wide boundary of a binary mask `[H, W]` (bool, same shape), as DAVIS
    `_seg2bmap` (D. Martin's BSDS seg2bmap): a pixel is on it when it differs from its right,
    lower or lower-right neighbour; on the last row only the right neighbour counts, on the last
    column only the lower one, and the bottom-right pixel never is on it, so the image border
    itself is no boundary."""
    mask = np.asarray(mask, dtype=bool)
    right, below, below_right = (np.zeros_like(mask) for _ in range(3))
    right[:, :-1], below[:-1, :], below_right[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ below_right)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def boundary_radius(shape: Sequence[int], tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """Match distance in pixels for an image of `shape` `(H, W)`: `tolerance` itself when it is
    >= 1, else ceil(tolerance * diagonal) (DAVIS `f_measure`: 8 px at 854x480)."""
    return tolerance if tolerance >= 1 else math.ceil(tolerance * math.hypot(shape[0], shape[1]))


def boundary_f_measure(annotation: np.ndarray, segmentation: np.ndarray,
                       tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary F-measure of two binary masks `[H, W]`, in [0, 1], as the davis2017-evaluation
    toolkit's `f_measure`: precision = share of the segmentation's boundary pixels within
    `boundary_radius` (Euclidean) of an annotation boundary pixel, recall the converse, F their
    harmonic mean. An empty boundary on one side gives F = 0, on both sides F = 1.

    The toolkit dilates each boundary with skimage's disk(radius) (a pixel-distance test, not
    the one-to-one bipartite matching of the 2016 MATLAB toolkit); the distance transform here
    is the same test. Raises ValueError when the shapes differ.
    """
    annotation, segmentation = _binary_pair(annotation, segmentation)
    radius = boundary_radius(annotation.shape, tolerance)
    gt_boundary, seg_boundary = boundary_map(annotation), boundary_map(segmentation)
    n_gt, n_seg = np.count_nonzero(gt_boundary), np.count_nonzero(seg_boundary)
    if n_gt == 0 or n_seg == 0:
        return 1.0 if n_gt == n_seg else 0.0
    # Every boundary pixel lies in this box, so distances to the nearest one are the same inside it.
    rows, cols = np.nonzero(gt_boundary | seg_boundary)
    box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    gt_boundary, seg_boundary = gt_boundary[box], seg_boundary[box]
    precision = np.count_nonzero(seg_boundary & (ndimage.distance_transform_edt(~gt_boundary) <= radius)) / n_seg
    recall = np.count_nonzero(gt_boundary & (ndimage.distance_transform_edt(~seg_boundary) <= radius)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_statistics(per_frame: Sequence[float]) -> dict[str, float]:
    """Mean, recall (share of frames above 0.5) and decay (mean of the first quarter of the
    frames minus that of the last quarter) of one object's per-frame J or F, as the toolkit's
    `db_statistics` (its four overlapping bins included). Raises ValueError when empty."""
    values = np.asarray(per_frame, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no frame to take statistics over")
    edges = np.round(np.linspace(1, len(values), 5) + 1e-10).astype(int) - 1
    quarters = [values[edges[i]:edges[i + 1] + 1] for i in range(4)]
    return {"mean": float(values.mean()), "recall": float((values > 0.5).mean()),
            "decay": float(quarters[0].mean() - quarters[3].mean())}


def _binary_pair(annotation: np.ndarray, segmentation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    annotation, segmentation = np.asarray(annotation, dtype=bool), np.asarray(segmentation, dtype=bool)
    if annotation.shape != segmentation.shape or annotation.ndim != 2:
        raise ValueError(f"masks must be two [H, W] arrays of one shape, got {list(annotation.shape)} and "
                         f"{list(segmentation.shape)}")
    return annotation, segmentation


# ---------------------------------------------------------------------------------------------
# Propagation (official eval_video_segmentation.py: label_propagation, restrict_neighborhood)

def feature_size(frame_size: Sequence[int], size: int, patch_size: int) -> tuple[int, int]:
    """`(H', W')` a frame of `frame_size` `(H, W)` is resized to: shorter side `size` (0: the
    frame's own), the other in proportion, both floored to a multiple of `patch_size` (at least
    one patch). The official floors the longer side to a multiple of 64 instead (854x480 ->
    832x480; here 848x480 at patch 16)."""
    height, width = frame_size
    scale = size / min(height, width) if size else 1.0
    return tuple(max(patch_size, round(side * scale) // patch_size * patch_size) for side in (height, width))


@torch.no_grad()
def propagate_labels(target: torch.Tensor, sources: torch.Tensor, source_labels: torch.Tensor,
                     grid: tuple[int, int], *, topk: int = 5, temperature: float = 0.1,
                     neighbourhood: int = 12) -> torch.Tensor:
    """Soft labels of one frame's patches from labelled context frames (official
    `label_propagation`).

    `target` `[N, D]`: the frame's L2-normalised patch features, N = h*w in row-major order of
    `grid` `(h, w)`; `sources` `[T, N, D]`: T context frames' features on the same grid;
    `source_labels` `[T, N, C]`: their (soft) labels. Each target patch takes the `topk` context
    patches of highest cosine similarity, over all T frames together, among those whose grid
    position is within `neighbourhood` patches of its own in both directions (a square of side
    2 * neighbourhood + 1; 0: no limit, as the official), and averages their labels with weights
    softmax(similarity / temperature) over the kept ones (the official exp(sim / 0.1), zeroed
    outside the window and below the k-th, then normalised). Returns `[N, C]` float on the
    features' device. Raises ValueError for shapes that do not fit.

    The official scores every pair of patches and masks the window afterwards; where the window
    is smaller than the grid, `_propagate_windowed` scores only the context patches within reach
    and keeps the same neighbours and weights.
    """
    context, patches, dim = sources.shape
    height, width = grid
    if target.shape != (patches, dim) or source_labels.shape[:2] != (context, patches) or height * width != patches:
        raise ValueError(f"target {list(target.shape)}, sources {list(sources.shape)}, labels "
                         f"{list(source_labels.shape)} and grid {height}x{width} do not fit together")
    keys = sources.reshape(context * patches, dim)
    labels = source_labels.reshape(context * patches, -1).to(target.dtype)
    k = min(topk, context * patches)
    if 0 < neighbourhood < max(height, width) - 1:
        return _propagate_windowed(target, keys, labels, grid, k, temperature, neighbourhood)
    chunk = max(1, AFFINITY_CHUNK // (context * patches))
    out = []
    for start in range(0, patches, chunk):
        similarity = target[start:start + chunk] @ keys.T  # [q, T*N]
        values, indices = similarity.topk(k, dim=1)
        weights = torch.softmax(values / temperature, dim=1)
        out.append(torch.einsum("qk,qkc->qc", weights, labels[indices]))
    return torch.cat(out)


def _propagate_windowed(target: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
                        k: int, temperature: float, neighbourhood: int) -> torch.Tensor:
    """`propagate_labels` with a window smaller than the grid: `target` `[N, D]`, `keys` `[T*N, D]`
    and `labels` `[T*N, C]` (the T context frames one after the other); returns `[N, C]`.

    The target grid is cut into tiles of `WINDOW_TILE` x `WINDOW_TILE` patches; each tile is
    scored against the context patches of the T frames within reach of any of its patches (one
    matrix product per tile, in batches of tiles), and what lies outside a patch's own window
    is masked as in the official, so that the top-k and softmax see the same finite values.
    """
    height, width = grid
    patches, dim = target.shape
    context = keys.shape[0] // patches
    row_targets, row_real, row_keys, row_reach = _window_tiles(height, neighbourhood, target.device)
    col_targets, col_real, col_keys, col_reach = _window_tiles(width, neighbourhood, target.device)
    tiles = len(row_targets) * len(col_targets)
    target_index = (row_targets[:, None, :, None] * width + col_targets[None, :, None, :]).reshape(tiles, -1)
    real = (row_real[:, None, :, None] & col_real[None, :, None, :]).reshape(tiles, -1)
    key_positions = (row_keys[:, None, :, None] * width + col_keys[None, :, None, :]).reshape(tiles, 1, -1)
    queries, reach = target_index.shape[1], key_positions.shape[2]
    key_index = (torch.arange(context, device=target.device)[:, None] * patches + key_positions).reshape(tiles, -1)
    far = ~(row_reach[:, None, :, None, :, None] & col_reach[None, :, None, :, None, :]).reshape(
        tiles, queries, 1, reach)
    out = target.new_empty(patches, labels.shape[1])
    chunk = max(1, WINDOW_CHUNK // (context * reach * dim))
    for start in range(0, tiles, chunk):
        part = slice(start, start + chunk)
        similarity = torch.bmm(target[target_index[part]], keys[key_index[part]].transpose(1, 2))  # [t, q, T*reach]
        # Every target patch reaches its own position in each context frame, so some key stays finite.
        similarity = similarity.view(-1, queries, context, reach).masked_fill(far[part], float("-inf")).flatten(2)
        values, indices = similarity.topk(min(k, context * reach), dim=2)
        weights = torch.softmax(values / temperature, dim=2)
        chosen = key_index[part, None].expand(-1, queries, -1).gather(2, indices)
        soft = torch.einsum("tqk,tqkc->tqc", weights, labels[chosen])
        out[target_index[part][real[part]]] = soft[real[part]]
    return out


def _window_tiles(size: int, neighbourhood: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """One grid axis of `size` patches cut into tiles for `_propagate_windowed`: the target
    positions of each tile `[tiles, t]` (past the end, repeats of the last one, which keep every
    tile the same size), whether each is not such a repeat `[tiles, t]`, the context positions
    scored with the tile `[tiles, s]` (all within reach of the tile, shifted inside the axis at
    its ends) and whether each target position reaches each of them `[tiles, t, s]`."""
    tile = min(WINDOW_TILE, size)
    span = min(size, tile + 2 * neighbourhood)
    starts = torch.arange(0, size, tile, device=device)
    positions = starts[:, None] + torch.arange(tile, device=device)
    targets = positions.clamp(max=size - 1)
    keys = (starts - neighbourhood).clamp(0, size - span)[:, None] + torch.arange(span, device=device)
    return targets, positions < size, keys, (targets[:, :, None] - keys[:, None, :]).abs() <= neighbourhood


def labels_to_segmentation(soft_labels: torch.Tensor, grid: tuple[int, int], patch_size: int,
                           frame_size: tuple[int, int]) -> np.ndarray:
    """The label map `[H, W]` (uint8) of patch soft labels `[h*w, C]`: upsampled bilinearly by
    `patch_size`, each label's map min-max scaled to [0, 1] where it varies (official
    `norm_mask`, which gives small objects a chance against the background; a constant map is
    left as it is, where the official divides by zero), argmax, then resized (nearest) to
    `frame_size` `(H, W)`, as the official."""
    height, width = grid
    scores = soft_labels.T.reshape(1, -1, height, width).float()
    scores = F.interpolate(scores, scale_factor=patch_size, mode="bilinear", align_corners=False)[0]
    low, high = scores.amin(dim=(1, 2), keepdim=True), scores.amax(dim=(1, 2), keepdim=True)
    spread = high - low
    scores = torch.where(spread > 0, (scores - low) / spread.clamp_min(torch.finfo(scores.dtype).tiny), scores)
    labels = scores.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((frame_size[1], frame_size[0]), Image.Resampling.NEAREST))


@torch.no_grad()
def propagate_video(backbone: nn.Module, frames: Iterable[np.ndarray], first_mask: np.ndarray, *,
                    size: int = 0, n_last_frames: int = 7, topk: int = 5, neighbourhood: int = 12,
                    temperature: float = 0.1, drop_high_variance: int = 0,
                    batch_size: int = 8) -> Iterator[np.ndarray]:
    """Yields the label map `[H, W]` (uint8) of every frame of a video, the first frame's being
    `first_mask` itself, the others propagated from it (see the module docstring and
    `propagate_labels`).

    `frames`: uint8 `[H, W, 3]` arrays, all of the first mask's size; `first_mask`: uint8
    `[H, W]` object ids (0 = background). Frames are embedded `batch_size` at a time on the
    backbone's device. `drop_high_variance` > 0 drops that many feature dimensions of highest
    variance over the first frame's patches, in every frame, before L2-normalising (see
    `fastdino.eval.knn.drop_high_variance_dimensions`). Raises ValueError for a frame of
    another size, or `drop_high_variance` not below the feature width.
    """
    from fastdino.api import extract_features
    from fastdino.eval.knn import drop_high_variance_dimensions

    patch_size = backbone.patch_embed.patch_size
    device = next(backbone.parameters()).device
    frame_size = first_mask.shape[:2]
    resized = feature_size(frame_size, size, patch_size)
    grid = (resized[0] // patch_size, resized[1] // patch_size)
    small_mask = np.asarray(Image.fromarray(first_mask).resize(grid[::-1], Image.Resampling.NEAREST))
    first_labels = F.one_hot(torch.from_numpy(small_mask.astype(np.int64)).flatten().to(device),
                             int(first_mask.max()) + 1).float()
    first_raw, first_features = None, None
    previous: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames)
    for batch in _batched(frames, batch_size):
        for frame in batch:
            if frame.shape[:2] != frame_size:
                raise ValueError(f"frame of size {frame.shape[1]}x{frame.shape[0]} in a video whose first mask is "
                                 f"{frame_size[1]}x{frame_size[0]}")
        pixels = torch.from_numpy(np.stack([
            np.asarray(Image.fromarray(frame).resize(resized[::-1], Image.Resampling.BILINEAR)) for frame in batch
        ])).permute(0, 3, 1, 2)
        tokens = extract_features(backbone, pixels, batch_size=len(batch), device=device)["patch"].to(device)
        if first_raw is None:
            first_raw = tokens[0]
        if drop_high_variance:
            features = drop_high_variance_dimensions(first_raw, tokens.flatten(0, 1), drop_high_variance)[1]
            features = features.view(len(batch), tokens.shape[1], -1)
        else:
            features = F.normalize(tokens, dim=-1)
        for target in features:
            if first_features is None:
                first_features = target
                yield first_mask
                continue
            soft = propagate_labels(target, torch.stack([first_features, *(f for f, _ in previous)]),
                                    torch.stack([first_labels, *(s for _, s in previous)]), grid, topk=topk,
                                    temperature=temperature, neighbourhood=neighbourhood)
            previous.append((target, soft))
            yield labels_to_segmentation(soft, grid, patch_size, frame_size)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# DAVIS-2017 folders, palette, pictures

@dataclass
class Video:
    """One DAVIS video: its frame files in order and the annotation file of each (same stem;
    a missing one is None)."""
    name: str
    frames: list[Path]
    annotations: list[Path | None]


def read_davis(root: str | Path, split: str = "val", videos: Sequence[str] | None = None,
               resolution: str = "480p") -> list[Video]:
    """The videos of a DAVIS-2017 folder: `JPEGImages/<resolution>/<video>/<frame>.jpg` and
    `Annotations/<resolution>/<video>/<frame>.png`, the names listed in `ImageSets/2017/<split>.txt`
    (or `videos`, which need no list). Raises FileNotFoundError for a missing folder, list,
    video, first annotation or the annotation of a frame to be scored (all but the first and
    last), ValueError for a video of fewer than 3 frames (DAVIS scores none of them).
    """
    root = Path(root)
    frames_root, annotations_root = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    for folder in (frames_root, annotations_root):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} not found: a DAVIS-2017 folder holds JPEGImages/{resolution}/<video>/, "
                                    f"Annotations/{resolution}/<video>/ and ImageSets/2017/<split>.txt")
    if videos is None:
        listing = root / "ImageSets" / "2017" / f"{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} not found: list the {split} videos there, one a line, or name them "
                                    f"with --videos")
        videos = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not videos:
            raise ValueError(f"{listing} lists no video")
    out = []
    for name in videos:
        folder = frames_root / name
        frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES) if folder.is_dir() else []
        if not frames:
            raise FileNotFoundError(f"no frames (.jpg/.png) in {folder}: is {name!r} a video of {root}?")
        if len(frames) < 3:
            raise ValueError(f"video {name} has {len(frames)} frames; DAVIS scores all but the first and the last, "
                             f"so it needs at least 3")
        annotations = [annotations_root / name / f"{frame.stem}.png" for frame in frames]
        for index, annotation in enumerate(annotations[:-1]):
            if not annotation.is_file():
                what = "the first frame's mask" if index == 0 else "every frame but the last needs one to be scored"
                raise FileNotFoundError(f"annotation {annotation} not found ({what})")
        out.append(Video(name, frames, [a if a.is_file() else None for a in annotations]))
    return out


def read_annotation(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(object ids uint8 `[H, W]`, its palette `[256, 3]` or None) of a DAVIS annotation: a
    palette ("P") or grey ("L") PNG. Void (255) becomes background, as the davis2017-evaluation
    toolkit reads it. Raises ValueError for another mode or an unreadable file."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"annotation {path} is a {image.mode} image: DAVIS annotations are palette PNGs "
                                 f"of object ids (0 = background)")
            palette = image.getpalette() if image.mode == "P" else None
            labels = np.array(image, dtype=np.uint8)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read annotation {path}: {exc}") from None
    labels[labels == VOID_LABEL] = 0
    if palette is not None:
        palette = np.resize(np.asarray(palette, dtype=np.uint8), 768).reshape(256, 3)
    return labels, palette


def davis_palette() -> np.ndarray:
    """The colours `[256, 3]` (uint8) of DAVIS annotations, which are Pascal VOC's: the bits of
    an id are dealt to red, green and blue from the most significant bit down (id 1 dark red,
    2 dark green, 3 olive, ...)."""
    ids = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


def overlay_labels(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 `[H, W, 3]`: `image` with each object's pixels (`labels` > 0) blended with its
    palette colour."""
    blended = image.astype(np.float32)
    objects = labels > 0
    blended[objects] = (1 - alpha) * blended[objects] + alpha * palette[labels[objects]].astype(np.float32)
    return blended.round().astype(np.uint8)


def save_video_strip(path: Path, shown: list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]],
                     palette: np.ndarray, title: str) -> Path:
    """One PNG: for each `(frame index, image [H, W, 3], annotation [H, W] or None, prediction
    [H, W])`, the annotation (top row) and the propagated mask (bottom row) over the frame."""
    from matplotlib.figure import Figure

    height, width = shown[0][1].shape[:2]
    panel = 2.6
    fig = Figure(figsize=(panel * len(shown), 2 * panel * height / width + 0.6), layout="constrained")
    axes = fig.subplots(2, len(shown), squeeze=False)
    for column, (index, image, annotation, prediction) in enumerate(shown):
        for row, labels in enumerate((annotation, prediction)):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(image if labels is None else overlay_labels(image, labels, palette))
        axes[0, column].set_title(f"frame {index}" + (" (given)" if index == 0 else ""))
    axes[0, 0].set_ylabel("annotation")
    axes[1, 0].set_ylabel("propagated")
    fig.suptitle(title)
    return save_figure(fig, path)


def _save_indexed(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    image = Image.fromarray(labels)
    image.putpalette(palette.ravel().tolist())  # makes the "L" image a "P" one
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------------------------------------
# Evaluation over videos

@torch.no_grad()
def evaluate_davis(backbone: nn.Module, videos: Sequence[Video], *, size: int = 0, n_last_frames: int = 7,
                   topk: int = 5, neighbourhood: int = 12, temperature: float = 0.1, drop_high_variance: int = 0,
                   batch_size: int = 8, png_dir: Path | None = None, masks_dir: Path | None = None,
                   strip_frames: int = 5, progress: bool = True) -> dict:
    """Propagates each video's first mask (`propagate_video`) and scores it (module docstring).

    Returns, in percent: "J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall",
    "F-Decay" (means over all objects), "objects", "frames" and "videos": {name: {"J&F",
    "objects": {id: {"J", "F"}}, "frames", "frame_size" [H, W], "feature_grid" [h, w]}}. With
    `png_dir`, writes `<png_dir>/<video>.png` (`save_video_strip` over `strip_frames` frames
    spread over the video); with `masks_dir`, `<masks_dir>/<video>/<frame>.png` palette PNGs in
    the DAVIS results layout, which the davis2017-evaluation toolkit scores. Raises what
    `read_annotation`, `propagate_video` raise, ValueError for an annotation of another size
    than its frame or a first annotation without any object.
    """
    from tqdm import tqdm

    from fastdino.data.images import load_rgb

    patch_size = backbone.patch_embed.patch_size
    bar = tqdm(total=sum(len(v.frames) for v in videos), desc="frames", unit="frame", dynamic_ncols=True,
               leave=False, file=sys.stderr, disable=not progress)
    per_video, statistics = {}, {"J": [], "F": []}
    for video in videos:
        bar.set_postfix_str(video.name)
        first_mask, palette = read_annotation(video.annotations[0])
        palette = davis_palette() if palette is None else palette
        num_objects = int(first_mask.max())
        if num_objects == 0:
            raise ValueError(f"the first annotation of video {video.name} ({video.annotations[0]}) has no object")
        count = len(video.frames)
        shown_indices = set(np.linspace(0, count - 1, min(strip_frames, count)).round().astype(int).tolist())
        scores = {"J": [[] for _ in range(num_objects)], "F": [[] for _ in range(num_objects)]}
        shown = []

        def frames() -> Iterator[np.ndarray]:
            for path in video.frames:
                frame = load_rgb(path)
                if frame.shape[:2] != first_mask.shape:
                    raise ValueError(f"frame {path} is {frame.shape[1]}x{frame.shape[0]} but the annotation "
                                     f"{video.annotations[0]} is {first_mask.shape[1]}x{first_mask.shape[0]}")
                yield frame

        predictions = propagate_video(backbone, frames(), first_mask, size=size, n_last_frames=n_last_frames,
                                      topk=topk, neighbourhood=neighbourhood, temperature=temperature,
                                      drop_high_variance=drop_high_variance, batch_size=batch_size)
        for index, prediction in enumerate(predictions):
            annotation = None
            if video.annotations[index] is not None:
                annotation = read_annotation(video.annotations[index])[0]
                if annotation.shape != prediction.shape:
                    raise ValueError(f"annotation {video.annotations[index]} is {annotation.shape[1]}x"
                                     f"{annotation.shape[0]} but its frame is {prediction.shape[1]}x"
                                     f"{prediction.shape[0]}")
            if 0 < index < count - 1:
                for obj in range(num_objects):
                    truth, predicted = annotation == obj + 1, prediction == obj + 1
                    scores["J"][obj].append(jaccard(truth, predicted))
                    scores["F"][obj].append(boundary_f_measure(truth, predicted))
            if masks_dir is not None:
                _save_indexed(Path(masks_dir) / video.name / f"{video.frames[index].stem}.png", prediction, palette)
            if index in shown_indices:
                shown.append((index, load_rgb(video.frames[index]), annotation, prediction))
            bar.update()
        objects = {}
        for obj in range(num_objects):
            j, f = davis_statistics(scores["J"][obj]), davis_statistics(scores["F"][obj])
            statistics["J"].append(j)
            statistics["F"].append(f)
            objects[str(obj + 1)] = {"J": 100 * j["mean"], "F": 100 * f["mean"]}
        resized = feature_size(first_mask.shape, size, patch_size)
        per_video[video.name] = {
            "J&F": float(np.mean([(o["J"] + o["F"]) / 2 for o in objects.values()])), "objects": objects,
            "frames": count, "frame_size": list(first_mask.shape),
            "feature_grid": [resized[0] // patch_size, resized[1] // patch_size]}
        if png_dir is not None:
            save_video_strip(Path(png_dir) / f"{video.name}.png", shown, palette,
                             f"{video.name}: J {np.mean([o['J'] for o in objects.values()]):.1f}  "
                             f"F {np.mean([o['F'] for o in objects.values()]):.1f}")
    bar.close()
    results = {}
    for measure in ("J", "F"):
        for key, name in (("mean", "Mean"), ("recall", "Recall"), ("decay", "Decay")):
            results[f"{measure}-{name}"] = 100 * float(np.mean([s[key] for s in statistics[measure]]))
    return {"J&F-Mean": (results["J-Mean"] + results["F-Mean"]) / 2, **results,
            "objects": len(statistics["J"]), "frames": sum(v["frames"] for v in per_video.values()),
            "videos": per_video}


# ---------------------------------------------------------------------------------------------
# Command

def build_parser():
    from fastdino.eval.command import add_run_arguments, add_weights_arguments, command_parser

    parser = command_parser(
        "video",
        "Semi-supervised video object segmentation on DAVIS-2017 by label propagation (DINO Sec. 4.2.3, official "
        "eval_video_segmentation.py): each frame's L2-normalised last-layer patch tokens take the labels of their "
        "top-k most similar patches in the first frame (given mask) and the n preceding frames (propagated), within "
        "a local window. Scored per object with J (region IoU) and F (boundary F-measure) over all frames but the "
        "first and last, as the davis2017-evaluation toolkit; prints and writes J&F-Mean, J-Mean, F-Mean (percent).")
    add_weights_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="DAVIS-2017 folder: JPEGImages/480p/<video>/*.jpg, Annotations/480p/<video>/*.png "
                             "(palette PNGs of object ids), ImageSets/2017/<split>.txt")
    parser.add_argument("--split", default="val", help="video list ImageSets/2017/SPLIT.txt (default val)")
    parser.add_argument("--videos", help="comma-separated video names to evaluate instead of the split's list")
    parser.add_argument("--resolution", default="480p",
                        help="sub-folder of JPEGImages and Annotations (default 480p; Full-Resolution)")
    parser.add_argument("--size", type=int, default=0,
                        help="resize frames so the shorter side is this many pixels, both sides floored to whole "
                             "patches (default 0: the frames' own size, as official: 480 for DAVIS 480p; on a CPU "
                             "a smaller size is much faster, the cost growing with the square of the patch count)")
    parser.add_argument("--n-last-frames", type=int, default=7,
                        help="preceding frames used as context besides the first (default 7)")
    parser.add_argument("--topk", type=int, default=5, help="context patches each patch takes labels from (default 5)")
    parser.add_argument("--size-mask-neighborhood", type=int, default=12,
                        help="context patches must lie within this many patches of the target patch's position "
                             "(default 12; 0: anywhere)")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="softmax temperature over the kept cosine similarities (default 0.1, as official)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames embedded per forward pass (default 8)")
    parser.add_argument("--png", metavar="DIR",
                        help="write DIR/<video>.png: a few frames with the annotation and the propagated masks "
                             "overlaid in the DAVIS palette (default: when --json is given, a folder beside it named "
                             "like it with _png for its suffix: --json out/video.json writes out/video_png/)")
    parser.add_argument("--save-masks", metavar="DIR",
                        help="write the propagated masks as DAVIS palette PNGs, DIR/<video>/<frame>.png (the "
                             "davis2017-evaluation toolkit's results layout)")
    add_run_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino eval video ...`: prints J&F per video and overall, writes --json, --png, --save-masks."""
    from fastdino.eval.command import eval_device, read_backbone, write_json

    args = build_parser().parse_args(argv)
    for flag, value, least in (("--size", args.size, 0), ("--topk", args.topk, 1),
                               ("--n-last-frames", args.n_last_frames, 0), ("--batch-size", args.batch_size, 1),
                               ("--size-mask-neighborhood", args.size_mask_neighborhood, 0),
                               ("--drop-high-variance", args.drop_high_variance, 0)):
        if value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    names = None
    if args.videos is not None:
        names = [name.strip() for name in args.videos.split(",") if name.strip()]
        if not names:
            raise ValueError("--videos names no video: give comma-separated names, e.g. "
                             "--videos bike-packing,blackswan")
    videos = read_davis(args.data, args.split, names, args.resolution)
    device = eval_device(args.device)
    backbone, weights = read_backbone(args, device)
    if 0 < args.size < backbone.patch_embed.patch_size:
        raise ValueError(f"--size {args.size} is smaller than the patch size {backbone.patch_embed.patch_size}")
    png_dir = Path(args.png) if args.png else None
    if png_dir is None and args.json:
        png_dir = Path(args.json).with_name(f"{Path(args.json).stem}_png")
    started = time.perf_counter()
    results = evaluate_davis(backbone, videos, size=args.size, n_last_frames=args.n_last_frames, topk=args.topk,
                             neighbourhood=args.size_mask_neighborhood, temperature=args.temperature,
                             drop_high_variance=args.drop_high_variance, batch_size=args.batch_size,
                             png_dir=png_dir, masks_dir=Path(args.save_masks) if args.save_masks else None)
    seconds = time.perf_counter() - started
    for name, video in results["videos"].items():
        print(f"{name:<24s} J&F {video['J&F']:6.2f}  " + "  ".join(
            f"object {obj}: J {s['J']:.2f} F {s['F']:.2f}" for obj, s in video["objects"].items()))
    print(f"{args.which} J&F-Mean {results['J&F-Mean']:.2f}  J-Mean {results['J-Mean']:.2f}  "
          f"F-Mean {results['F-Mean']:.2f}  ({results['objects']} objects, {len(videos)} videos, "
          f"{results['frames']} frames, {seconds:.1f} s)")
    results.update({
        "seconds": seconds,
        "checkpoint": str(weights.source or args.checkpoint),
        "step": weights.step,
        "settings": {"data": str(args.data), "split": args.split if names is None else None,
                     "videos": [v.name for v in videos], "resolution": args.resolution, "size": args.size,
                     "n_last_frames": args.n_last_frames, "topk": args.topk,
                     "size_mask_neighborhood": args.size_mask_neighborhood, "temperature": args.temperature,
                     "drop_high_variance": args.drop_high_variance, "which": args.which,
                     "arch": args.arch or weights.arch, "patch_size": backbone.patch_embed.patch_size,
                     "device": str(device), "boundary_tolerance": BOUNDARY_TOLERANCE,
                     "scored_frames": "all but the first and the last"}})
    write_json(args.json, results)
    if png_dir is not None:
        print(f"wrote {png_dir}/<video>.png for {len(videos)} videos", file=sys.stderr)
    return 0
