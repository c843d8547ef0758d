"""Image retrieval by cosine similarity of frozen CLS features, as DINO's Sec. 5.1.3 and the
official `eval_image_retrieval.py` (facebookresearch/dino).

Every image is embedded by the backbone's CLS token (after the final norm), optionally averaged
over the scales 1, 1/sqrt(2), 1/2 (`--multiscale`, the official `utils.multi_scale`), and
L2-normalised; the database is ranked for each query by cosine similarity, ties in database
order. No whitening and no GeM pooling: the official retrieval script has none (the learnt
whitening and GeM pooling of the official copy-detection evaluation are not part of it).

Two protocols:
  * revisited Oxford/Paris (Radenovic et al. 2018, filipradenovic/revisitop): `jpg/<name>.jpg`
    and `gnd_<dataset>.pkl`; queries cropped to their `bbx` as the revisited protocol prescribes
    (`--full-queries`: whole query images, as the official DINO script does); mAP and mP@k under
    Easy, Medium and Hard, as revisitop's `compute_map`.
  * instance folders (`<instance>/<image>`): every image queries all the others, the images of
    its own folder being its positives; mAP (revisitop's AP), mP@k and R@k.
"""
from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastdino.eval.command import save_figure

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The official utils.multi_scale: features of the image at these scales, summed.
MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)
# Revisited protocols: (positive lists, junk lists) of each query's ground truth, as revisitop's
# example_evaluate.py builds them; the official DINO script reports Medium and Hard.
PROTOCOLS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
# Border colours of the figure: positive, negative, junk.
STATUS_COLOURS = {"positive": (40, 170, 60), "negative": (215, 40, 40), "junk": (150, 150, 150)}


@dataclass
class RetrievalSet:
    """What to embed and how to score it: the database images, the query images (with their
    boxes, revisited only) and the ground truth (revisitop `gnd` entries, or instance labels)."""

    protocol: str  # "revisited" | "instances"
    name: str  # the data set: <dataset> of gnd_<dataset>.pkl, or the folder's name
    database: list[Path]
    queries: list[Path]
    query_boxes: list[tuple[float, float, float, float] | None]
    ground_truth: list[dict] | None = None  # revisited: {"easy", "hard", "junk"} int64 arrays per query
    labels: np.ndarray | None = None  # instances: the instance index of each database image
    instance_names: list[str] | None = None


# ---------------------------------------------------------------------------------------------
# Metrics


def ranked_metrics(positive: np.ndarray, junk: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-query retrieval metrics of ranked lists, revisitop's `compute_map` conventions.

    `positive` and `junk` are bool `[Q, N]`: whether the image ranked at position t (0-based,
    best first) for query q is a positive / a junk image of q. Junk images are taken out of the
    ranking: each positive moves up by the junk images ranked above it (an image that is both
    counts as a positive and still moves the later ones up, as in revisitop).

    Returns float64 arrays, NaN for queries without positives (which every mean skips):
      * `ap` `[Q]`: revisitop's `compute_ap`, the area under the precision-recall curve by
        trapezoids: the positive ranked j-th (0-based) among positives at rank r (0-based, junk
        removed) adds (j / r + (j + 1) / (r + 1)) / 2 / n_positives, where j / r is taken as 1
        at r = 0. It is never above the non-interpolated AP (the mean of (j + 1) / (r + 1),
        sklearn's `average_precision_score`), and equals it (1) only when all positives come first.
      * `revisited_precision` `[Q, len(ks)]`: revisitop's mP@k per query: with the last positive
        at 1-based rank m, k' = min(m, k) and the value is (positives within the first k') / k'.
      * `precision` `[Q, len(ks)]`: plain precision at k: positives within the first k / k, with
        k at most the number of images ranked (junk removed).
      * `recall` `[Q, len(ks)]`: 1 where a positive is within the first k, else 0 (the Recall@K
        of metric-learning papers).
    Raises ValueError when the two masks differ in shape or a k is not positive.
    """
    positive, junk = np.asarray(positive, bool), np.asarray(junk, bool)
    if positive.shape != junk.shape or positive.ndim != 2:
        raise ValueError(f"positive and junk must be [Q, N] masks of one shape, got {positive.shape} and {junk.shape}")
    if any(k < 1 for k in ks):
        raise ValueError(f"precision ranks k must be positive, got {list(ks)}")
    num_queries, length = positive.shape
    count = positive.sum(axis=1)
    # Rank once junk is removed: the position minus the junk images ranked strictly above.
    rank = np.arange(length) - (np.cumsum(junk, axis=1) - junk)
    above = np.cumsum(positive, axis=1) - positive  # j: positives ranked above this one
    before = np.where(rank > 0, above / np.maximum(rank, 1), 1.0)
    after = (above + 1) / (rank + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(positive, before + after, 0.0).sum(axis=1) / (2 * count)
        last = np.where(positive, rank + 1, 0).max(axis=1, initial=0)
        ranked = length - junk.sum(axis=1)
        revisited_precision = np.empty((num_queries, len(ks)))
        precision = np.empty((num_queries, len(ks)))
        recall = np.empty((num_queries, len(ks)))
        for column, k in enumerate(ks):
            within = positive & (rank < k)
            clipped = np.minimum(last, k)
            revisited_precision[:, column] = (positive & (rank < clipped[:, None])).sum(axis=1) / clipped
            precision[:, column] = within.sum(axis=1) / np.minimum(k, np.maximum(ranked, 1))
            recall[:, column] = within.any(axis=1)
    empty = count == 0
    ap[empty] = np.nan
    for values in (revisited_precision, precision, recall):
        values[empty] = np.nan
    return {"ap": ap, "revisited_precision": revisited_precision, "precision": precision, "recall": recall}


def summarise(metrics: dict[str, np.ndarray], ks: Sequence[int], *, revisited: bool) -> dict:
    """Means over the queries that have positives, in percent (None where no query has any):
    `mAP`, `mP@k` (revisitop's clipped precision for the revisited protocol, plain precision
    otherwise) and, for instance folders, `R@k`; with `queries` (evaluated) and
    `queries_without_positives` (skipped, as revisitop's `compute_map` skips them)."""
    evaluated = ~np.isnan(metrics["ap"])
    count = int(evaluated.sum())

    def mean(values: np.ndarray) -> float | None:
        return float(100.0 * values[evaluated].mean()) if count else None

    result = {"mAP": mean(metrics["ap"])}
    precision = metrics["revisited_precision" if revisited else "precision"]
    for column, k in enumerate(ks):
        result[f"mP@{k}"] = mean(precision[:, column])
    if not revisited:
        for column, k in enumerate(ks):
            result[f"R@{k}"] = mean(metrics["recall"][:, column])
    result["queries"] = count
    result["queries_without_positives"] = int(len(evaluated) - count)
    return result


def protocol_ground_truth(ground_truth: Sequence[dict], protocol: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(positive indices, junk indices) into the database for every query under a revisited
    protocol (Radenovic et al. 2018, Sec. 3; revisitop's example_evaluate.py): Easy: positives
    easy, junk junk + hard; Medium: positives easy + hard, junk junk; Hard: positives hard, junk
    junk + easy. Raises ValueError for an unknown protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    positive_keys, junk_keys = PROTOCOLS[protocol]
    return [(np.concatenate([entry[key] for key in positive_keys]), np.concatenate([entry[key] for key in junk_keys]))
            for entry in ground_truth]


def rank_database(query_features: torch.Tensor, database_features: torch.Tensor, *,
                  chunk_elements: int = 1 << 22) -> Iterator[tuple[int, np.ndarray]]:
    """Database indices by decreasing cosine similarity for each query: yields (first query of
    the chunk, int64 `[C, N]`), chunks of queries small enough for `chunk_elements` scores.

    Features `[Q, D]` and `[N, D]` must be L2-normalised (the dot product is the cosine). Equal
    similarities keep database order (a stable sort); the official script's unstable argsort
    leaves them in any order.
    """
    database_features = database_features.to(query_features.device)
    rows = max(1, chunk_elements // max(1, len(database_features)))
    for start in range(0, len(query_features), rows):
        similarity = query_features[start:start + rows] @ database_features.T
        yield start, torch.argsort(similarity, dim=1, descending=True, stable=True).cpu().numpy()


def evaluate_revisited(order: np.ndarray, ground_truth: Sequence[dict], ks: Sequence[int]) -> dict:
    """Easy, Medium and Hard results (`summarise`) of rankings `order` `[Q, N]` (database
    indices, best first) against revisitop ground truth (one {"easy", "hard", "junk"} per query)."""
    results = {}
    for protocol in PROTOCOLS:
        sets = protocol_ground_truth(ground_truth, protocol)
        positive = np.stack([np.isin(row, ok) for row, (ok, _) in zip(order, sets)])
        junk = np.stack([np.isin(row, bad) for row, (_, bad) in zip(order, sets)])
        results[protocol] = summarise(ranked_metrics(positive, junk, ks), ks, revisited=True)
    return results


def evaluate_instances(features: torch.Tensor, labels: np.ndarray, ks: Sequence[int]) -> dict:
    """Every image queries all the others (itself is junk: out of its ranking); positives are
    the images of the same instance. `features` `[N, D]` L2-normalised, `labels` `[N]` ints.
    Returns `summarise`'s dict (mAP, mP@k plain, R@k)."""
    labels = np.asarray(labels)
    parts = []
    # Chunks of 2^20 ranks: ranked_metrics holds a few float64 copies of each.
    for start, order in rank_database(features, features, chunk_elements=1 << 20):
        queries = np.arange(start, start + len(order))
        positive = (labels[order] == labels[queries][:, None]) & (order != queries[:, None])
        parts.append(ranked_metrics(positive, order == queries[:, None], ks))
    metrics = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return summarise(metrics, ks, revisited=False)


# ---------------------------------------------------------------------------------------------
# Data


class _GroundTruthUnpickler(pickle.Unpickler):
    """Reads revisitop's gnd pickles (dicts, lists, numbers, strings, numpy arrays) and refuses
    every other class, so a pickle cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds a {module}.{name} object; a gnd file holds only dicts, lists, "
                                         f"numbers, strings and numpy arrays")
        return super().find_class(module, name)


def read_ground_truth(path: Path) -> dict:
    """revisitop's `gnd_<dataset>.pkl`: {"imlist", "qimlist", "gnd"} with `gnd[q]` = {"bbx":
    [x1, y1, x2, y2] (optional), "easy", "hard", "junk": indices into imlist}. Returns it with
    the index lists as int64 arrays. Raises FileNotFoundError or ValueError (what is wrong)."""
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    try:
        with open(path, "rb") as file:
            data = _GroundTruthUnpickler(file).load()
    except Exception as exc:  # pickle raises many types for foreign or damaged files
        raise ValueError(f"cannot read {path} as a revisitop gnd pickle: {exc}") from None
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise ValueError(f"{path} is not a revisitop gnd pickle: it needs the keys imlist, qimlist and gnd")
    database, queries, entries = list(data["imlist"]), list(data["qimlist"]), list(data["gnd"])
    if len(entries) != len(queries):
        raise ValueError(f"{path}: {len(queries)} query names (qimlist) but {len(entries)} gnd entries")
    if not database or not queries:
        raise ValueError(f"{path} lists no {'database images (imlist)' if not database else 'queries (qimlist)'}")
    ground_truth = []
    for q, entry in enumerate(entries):
        lists = {}
        for key in ("easy", "hard", "junk"):
            values = np.asarray(entry.get(key, []), dtype=np.int64).reshape(-1)
            if values.size and (values.min() < 0 or values.max() >= len(database)):
                raise ValueError(f"{path}: query {q} ({queries[q]}) has {key} indices outside 0..{len(database) - 1}")
            lists[key] = values
        box = entry.get("bbx")
        if box is not None:
            box = tuple(float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1))
            if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
                raise ValueError(f"{path}: query {q} ({queries[q]}) has bbx {list(box)}, not [x1, y1, x2, y2] "
                                 f"with x1 < x2 and y1 < y2")
        lists["bbx"] = box
        ground_truth.append(lists)
    return {"imlist": [str(n) for n in database], "qimlist": [str(n) for n in queries], "gnd": ground_truth}


def read_revisited(folder: Path, gnd: Path | None = None) -> RetrievalSet:
    """The revisited layout: `folder/jpg/<name>.jpg` and `gnd` (default: the one
    `folder/gnd_*.pkl`). Raises FileNotFoundError (no gnd file, missing images) or ValueError
    (several gnd files, a bad gnd file)."""
    if gnd is None:
        candidates = sorted(folder.glob("gnd_*.pkl"))
        if not candidates:
            raise FileNotFoundError(f"no gnd_<dataset>.pkl in {folder}: pass --gnd FILE")
        if len(candidates) > 1:
            raise ValueError(f"{folder} holds {len(candidates)} ground-truth files "
                             f"({', '.join(c.name for c in candidates)}): choose one with --gnd FILE")
        gnd = candidates[0]
    data = read_ground_truth(gnd)
    images = folder / "jpg"

    def paths(names: list[str], what: str) -> list[Path]:
        found = [images / f"{name}.jpg" for name in names]
        missing = [p for p in found if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of the {len(found)} {what} images listed in {gnd.name} are not in "
                                    f"{images} (first: {missing[0].name})")
        return found

    name = gnd.stem[len("gnd_"):] if gnd.stem.startswith("gnd_") else gnd.stem
    return RetrievalSet("revisited", name, paths(data["imlist"], "database"), paths(data["qimlist"], "query"),
                        [entry["bbx"] for entry in data["gnd"]], ground_truth=data["gnd"])


def read_instances(folder: Path) -> RetrievalSet:
    """Instance folders `folder/<instance>/<image>` (image suffixes as IMAGE_SUFFIXES, sorted by
    name): database and queries are all the images. Raises FileNotFoundError when no sub-folder
    holds an image, ValueError for fewer than two instances or no instance with two images."""
    paths, labels, names = [], [], []
    for instance in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in instance.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            labels += [len(names)] * len(images)
            paths += images
            names.append(instance.name)
    if not paths:
        raise FileNotFoundError(f"no images in sub-folders of {folder}: expected <instance>/<image>.jpg|png, or the "
                                f"revisited layout jpg/ + gnd_<dataset>.pkl")
    if len(names) < 2:  # every other image would be a positive: a trivial 100 %
        raise ValueError(f"{folder} holds one instance folder ({names[0]}): instance retrieval needs at least two "
                         f"(<instance>/<image> folders; the revisited layout is jpg/ + gnd_<dataset>.pkl)")
    if max(np.bincount(labels)) < 2:
        raise ValueError(f"every instance folder in {folder} holds one image: no query has a positive")
    return RetrievalSet("instances", folder.resolve().name, paths, paths, [None] * len(paths),
                        labels=np.asarray(labels), instance_names=names)


def read_retrieval_set(folder: str | Path, gnd: str | Path | None = None, protocol: str = "auto") -> RetrievalSet:
    """The data set in `folder`: `protocol` "revisited", "instances", or "auto" (revisited when
    `gnd` is given or `folder` holds a `gnd_*.pkl`, else instance folders). Raises
    FileNotFoundError / ValueError with what is missing or ambiguous."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    if protocol == "auto":
        if gnd is not None or any(folder.glob("gnd_*.pkl")):
            protocol = "revisited"
        elif (folder / "jpg").is_dir():
            raise FileNotFoundError(f"{folder} has jpg/ but no gnd_<dataset>.pkl: pass --gnd FILE, or "
                                    f"--protocol instances to read its sub-folders as instances")
        else:
            protocol = "instances"
    if protocol == "revisited":
        return read_revisited(folder, None if gnd is None else Path(gnd))
    if protocol == "instances":
        if gnd is not None:
            raise ValueError("--gnd is for the revisited protocol, not instance folders")
        return read_instances(folder)
    raise ValueError(f"unknown protocol {protocol!r}; choose auto, revisited or instances")


def crop_box(pixels: np.ndarray, box: tuple[float, float, float, float] | None) -> np.ndarray:
    """`pixels` `[H, W, 3]` cut to `box` = (x1, y1, x2, y2) in pixels, rounded as PIL's
    `Image.crop` rounds (the revisited protocol's query crop, cirtorch/revisitop), clipped to the
    image. None: the whole image. Raises ValueError when nothing of the box is inside the image."""
    if box is None:
        return pixels
    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = (round(v) for v in box)
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"box {list(box)} lies outside the {width}x{height} image")
    return pixels[y1:y2, x1:x2]


def shrink_to_fit(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 `[H, W, 3]` shrunk, aspect kept, until both sides are at most `size` (PIL's
    `thumbnail` with Lanczos, as the official `OxfordParisDataset` and cirtorch's `imresize`; an
    image already within `size` is kept as it is). `size` 0: unchanged."""
    if not size or max(pixels.shape[:2]) <= size:
        return pixels
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image)


class RetrievalImages(torch.utils.data.Dataset):
    """`(index, uint8 [3, H, W])` of each image: read (fastdino.data.images.load_rgb), cut to its
    box (when given) and shrunk to `size` (`shrink_to_fit`). A failure comes back as `(index,
    message)` instead: a DataLoader worker's exception reaches the main process re-worded."""

    def __init__(self, paths: Sequence[Path], size: int, boxes: Sequence | None = None):
        self.paths, self.size = list(paths), size
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from fastdino.data.images import load_rgb

        try:
            pixels = shrink_to_fit(crop_box(load_rgb(self.paths[index]), self.boxes[index]), self.size)
        except Exception as exc:  # PIL raises many types for bad files
            return index, f"cannot read image {self.paths[index]}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        return index, torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # np.asarray(PIL image) is read-only


@torch.no_grad()
def embed_batch(backbone: torch.nn.Module, pixels: torch.Tensor, scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """L2-normalised sum of the CLS features (after the final norm) of uint8 images `[B, 3, H,
    W]` at each scale: bilinear resizing by the scale factor (align_corners=False) of the
    ImageNet-normalised image, then its bottom and right edges cut to whole patches, as the
    official ViT's strided patch convolution ignores them (official `utils.multi_scale`, which
    also divides by the number of scales: no change once normalised). Returns fp32 `[B, D]` on
    the CPU. Raises ValueError when an image is smaller than one patch at some scale."""
    from fastdino.api import extract_features
    from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

    device = next(backbone.parameters()).device
    patch = backbone.patch_embed.patch_size
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    images = (pixels.to(device).float() / 255 - mean) / std
    total = None
    for scale in scales:
        scaled = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                         align_corners=False)
        height, width = scaled.shape[-2] // patch * patch, scaled.shape[-1] // patch * patch
        if not height or not width:
            raise ValueError(f"a {images.shape[-1]}x{images.shape[-2]} image is {scaled.shape[-1]}x"
                             f"{scaled.shape[-2]} at scale {scale:.3f}, less than one {patch}-pixel patch: "
                             f"use a larger --size (or no --multiscale)")
        cls = extract_features(backbone, scaled[..., :height, :width], batch_size=len(scaled),
                               patch_tokens=False)["cls"]
        total = cls if total is None else total + cls
    return F.normalize(total, dim=1)


def embed_images(backbone: torch.nn.Module, images: RetrievalImages, *, batch_size: int = 64,
                 scales: Sequence[float] = (1.0,), workers: int = 0, desc: str = "embedding") -> torch.Tensor:
    """L2-normalised CLS features `[N, D]` (fp32, CPU, in `images` order) of images of any
    sizes, each at its own aspect ratio as the official script (which embeds one image at a
    time): images of one size are batched together (up to `batch_size`; when `4 * batch_size`
    images wait in unfinished batches, every waiting batch runs). `workers` DataLoader processes
    read and resize the images. Raises ValueError for an unreadable image or one smaller than a
    patch."""
    loader = torch.utils.data.DataLoader(images, batch_size=None, num_workers=workers)
    features: list[torch.Tensor | None] = [None] * len(images)
    waiting: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    count = 0

    def run(shape: tuple[int, int]) -> None:
        nonlocal count
        batch = waiting.pop(shape)
        count -= len(batch)
        try:
            embedded = embed_batch(backbone, torch.stack([pixels for _, pixels in batch]), scales)
        except ValueError as exc:
            raise ValueError(f"{images.paths[batch[0][0]]}: {exc}") from None
        for (index, _), feature in zip(batch, embedded):
            features[index] = feature

    from tqdm import tqdm

    for index, pixels in tqdm(loader, total=len(images), desc=desc, dynamic_ncols=True, leave=False):
        if isinstance(pixels, str):
            raise ValueError(pixels)
        shape = tuple(pixels.shape[1:])
        waiting.setdefault(shape, []).append((int(index), pixels))
        count += 1
        if len(waiting[shape]) >= batch_size:
            run(shape)
        elif count >= 4 * batch_size:
            for key in list(waiting):
                run(key)
    for key in list(waiting):
        run(key)
    return torch.stack(features)


# ---------------------------------------------------------------------------------------------
# Figure


def _framed(pixels: np.ndarray, colour: tuple[int, int, int], display: int) -> np.ndarray:
    """The image shrunk to `display` pixels at most, inside a border of `colour`."""
    pixels = shrink_to_fit(pixels, display)
    width = max(2, round(0.05 * max(pixels.shape[:2])))
    framed = np.empty((pixels.shape[0] + 2 * width, pixels.shape[1] + 2 * width, 3), np.uint8)
    framed[:] = colour
    framed[width:-width, width:-width] = pixels
    return framed


def save_ranking_figure(rows: Sequence[tuple[np.ndarray, str, Sequence[tuple[np.ndarray, str, str]]]],
                        path: str | Path, *, display: int = 160) -> Path:
    """One PNG: each row a query image (titled) and its ranked database images, each framed in
    green (positive), red (negative) or grey (junk) with its caption, the query in black. `rows` holds `(query uint8
    [H, W, 3], title, [(image uint8, status, caption), ...])`, status one of STATUS_COLOURS."""
    from matplotlib.figure import Figure

    columns = 1 + max(len(results) for _, _, results in rows)
    figure = Figure(figsize=(1.9 * columns, 2.1 * len(rows)))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (query, title, results) in zip(axes, rows):
        cells = [(_framed(query, (0, 0, 0), display), title)]
        cells += [(_framed(image, STATUS_COLOURS[status], display), caption) for image, status, caption in results]
        for axis in row:
            axis.axis("off")
        for axis, (image, caption) in zip(row, cells):
            axis.imshow(image)
            axis.set_title(caption, fontsize=7)
    figure.tight_layout()
    return save_figure(figure, path)


def ranking_rows(data: RetrievalSet, query_features: torch.Tensor, database_features: torch.Tensor,
                 shown: Sequence[int], top: int, *, full_queries: bool = False) -> list:
    """`save_ranking_figure` rows for queries `shown`: the query as embedded (its box crop unless
    `full_queries`) and its `top` best database images, statuses under the Medium protocol
    (revisited) or by instance (the query itself left out)."""
    from fastdino.data.images import load_rgb

    def name(path: Path) -> str:
        """The image's name, cut at the front to fit a figure cell."""
        text = path.stem if data.protocol == "revisited" else f"{path.parent.name}/{path.stem}"
        return text if len(text) <= 24 else "…" + text[-23:]

    rows = []
    for q in shown:
        order = next(rank_database(query_features[q:q + 1], database_features))[1][0]
        if data.protocol == "revisited":
            entry = data.ground_truth[q]
            positives = set(np.concatenate([entry["easy"], entry["hard"]]).tolist())
            junk = set(entry["junk"].tolist())
            box = None if full_queries else data.query_boxes[q]
        else:
            positives = set(np.flatnonzero(data.labels == data.labels[q]).tolist()) - {q}
            junk, box = set(), None
            order = order[order != q]
        results = []
        for rank, index in enumerate(order[:top].tolist(), start=1):
            status = "positive" if index in positives else "junk" if index in junk else "negative"
            similarity = float(query_features[q] @ database_features[index])
            results.append((load_rgb(data.database[index]), status,
                            f"{rank}: {name(data.database[index])}\ncos {similarity:.3f}"))
        rows.append((crop_box(load_rgb(data.queries[q]), box), f"query {name(data.queries[q])}", results))
    return rows


# ---------------------------------------------------------------------------------------------
# Command


def build_parser():
    from fastdino.eval.command import add_run_arguments, add_weights_arguments, command_parser

    parser = command_parser(
        "retrieval",
        "Image retrieval by cosine similarity of CLS features (DINO Sec. 5.1.3, official eval_image_retrieval.py).\n"
        "DATA is either the revisited Oxford/Paris layout (jpg/<name>.jpg + gnd_<dataset>.pkl): mAP and mP@k\n"
        "under the Easy, Medium and Hard protocols (revisitop's compute_map), queries cropped to their bbx; or\n"
        "instance folders (<instance>/<image>): every image queries the others, its folder's images are its\n"
        "positives; mAP, mP@k and R@k. No whitening (the official retrieval script has none).")
    add_weights_arguments(parser)
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="data folder: jpg/ + gnd_<dataset>.pkl (revisited), or <instance>/<image> folders")
    parser.add_argument("--protocol", choices=["auto", "revisited", "instances"], default="auto",
                        help="auto (default): revisited where a gnd_*.pkl is found (or --gnd given), else instances")
    parser.add_argument("--gnd", metavar="FILE", help="revisitop ground-truth pickle (default: the gnd_*.pkl in DATA)")
    parser.add_argument("--size", type=int, default=224,
                        help="images shrunk (aspect kept, never enlarged) until both sides are at most this, as the "
                             "official --imsize (PIL thumbnail); 0: as stored. Default 224, the official setting for "
                             "Oxford (its README uses 512 with --multiscale for Paris)")
    parser.add_argument("--multiscale", action="store_true",
                        help="sum the CLS features at scales 1, 1/sqrt(2), 1/2 before normalising "
                             "(official multi_scale)")
    parser.add_argument("--full-queries", action="store_true",
                        help="embed whole query images, as the official DINO script, instead of their bbx crops "
                             "(the revisited protocol)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], metavar="K",
                        help="ranks of the precision (and, for instances, recall) at k (default 1 5 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="images of one size embedded together (default 64)")
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0)) - 1),
                        help="image reading processes (default: up to 4, one core left to the model; 0: in this one)")
    parser.add_argument("--png", metavar="FILE",
                        help="draw the best-ranked database images of a few queries here (default: the --json path "
                             "with .png, when --json is given)")
    parser.add_argument("--show", type=int, default=4, help="queries in the PNG (default 4, spread over the queries)")
    parser.add_argument("--top", type=int, default=8, help="ranked images per query in the PNG (default 8)")
    add_run_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino eval retrieval ...`: prints mAP and mP@k per protocol, writes --json and --png."""
    from fastdino.eval.command import eval_device, read_backbone, write_json
    from fastdino.eval.knn import drop_high_variance_dimensions

    args = build_parser().parse_args(argv)
    for option in ("ks", "batch_size", "top", "show"):
        values = getattr(args, option)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {values}")
    if args.size < 0 or args.workers < 0:
        raise ValueError("--size and --workers must not be negative")
    data = read_retrieval_set(args.data, args.gnd, args.protocol)
    started = time.perf_counter()
    device = eval_device(args.device)
    backbone, weights = read_backbone(args, device)
    scales = MULTISCALE if args.multiscale else (1.0,)
    read = time.perf_counter()

    def embed(paths, boxes, desc):
        return embed_images(backbone, RetrievalImages(paths, args.size, boxes), batch_size=args.batch_size,
                            scales=scales, workers=args.workers, desc=desc)

    database = embed(data.database, None, "database")
    if data.protocol == "revisited":
        queries = embed(data.queries, None if args.full_queries else data.query_boxes, "queries")
    else:
        queries = database
    embedded = time.perf_counter()
    if args.drop_high_variance:
        database, queries = drop_high_variance_dimensions(database, queries, args.drop_high_variance)
    if data.protocol == "revisited":
        order = np.concatenate([part for _, part in rank_database(queries.to(device), database.to(device))])
        results = evaluate_revisited(order, data.ground_truth, args.ks)
    else:
        results = {"instances": evaluate_instances(database.to(device), data.labels, args.ks)}

    def percent(value):
        return "n/a" if value is None else f"{value:.2f}"

    for protocol, result in results.items():
        precision = " ".join(f"P@{k} {percent(result[f'mP@{k}'])}" for k in args.ks)
        skipped = result["queries_without_positives"]
        print(f"{data.name} {protocol}: mAP {percent(result['mAP'])}  {precision}  ({result['queries']} queries"
              f"{f', {skipped} without positives skipped' if skipped else ''})")
    summary = {
        "protocol": data.protocol,
        "dataset": data.name,
        "data": str(args.data),
        **results,
        "counts": {"database": len(data.database), "queries": len(data.queries),
                   **({"instances": len(data.instance_names)} if data.protocol == "instances" else {})},
        "settings": {"size": args.size, "multiscale": args.multiscale,
                     "scales": [round(s, 6) for s in scales],
                     "query_crop": data.protocol == "revisited" and not args.full_queries,
                     "drop_high_variance": args.drop_high_variance, "ks": args.ks,
                     "features": "CLS after the final norm, L2-normalised; cosine similarity; no whitening"},
        "checkpoint": {"path": str(args.checkpoint), "source": str(weights.source), "which": args.which,
                       "arch": args.arch or weights.arch, "patch_size": backbone.patch_embed.patch_size,
                       "step": weights.step},
        "seconds": {"embedding": round(embedded - read, 3), "total": round(time.perf_counter() - started, 3)},
    }
    png = args.png or (Path(args.json).with_suffix(".png") if args.json else None)
    if png:
        shown = np.unique(np.linspace(0, len(data.queries) - 1, min(args.show, len(data.queries))).round().astype(int))
        rows = ranking_rows(data, queries, database, shown.tolist(), args.top, full_queries=args.full_queries)
        summary["png"] = str(save_ranking_figure(rows, png))
        print(summary["png"])
    write_json(args.json, summary)
    return 0
