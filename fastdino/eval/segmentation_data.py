"""Images with per-pixel class masks, as `fastdino eval segment` and `fastdino eval attention-masks`
read them: the Pascal VOC layout and the plain pairs layout (see the README's data layouts).

* Pascal VOC (Everingham et al. 2010; VOCdevkit/VOC2012): `JPEGImages/<id>.jpg`,
  `SegmentationClass/<id>.png` (palette PNG whose indices are the labels), and the splits
  `ImageSets/Segmentation/<split>.txt` (one id per line).
* Pairs: `images/<name>.<jpg|jpeg|png>` and `masks/<name>.png` (same stem; "L" or "P" PNG).

Labels: 0 = background, 1..C-1 the classes, 255 = ignore (VOC marks object borders so). Class
names come from an optional `labels.txt` in the folder (line i = class i, background first), else
VOC's 21 names for the VOC layout, else `background, class 1, ...` up to the largest label found
in the pairs' masks.

Both commands see an image as `resize_to_patches` makes it (shorter side resized, bottom/right
cut to whole patches) and relate its patch grid to the mask at the mask's own resolution through
`patch_positions`: a pixel belongs to the patch its centre falls in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Mask modes whose pixel values are the labels themselves ("1": a bilevel foreground mask).
MASK_MODES = ("P", "L", "1")


@dataclass(frozen=True)
class SegmentationData:
    """One folder of images with label masks; build it with `open_segmentation_data`."""
    root: Path
    layout: str  # "voc" or "pairs"
    class_names: tuple[str, ...]
    images: dict[str, Path]  # id -> image file
    masks: dict[str, Path]  # id -> mask file

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def ids(self, split: str | None = None) -> list[str]:
        """Image ids of `split`, in the split file's order; all ids, sorted, when `split` is None.

        `split` is a text file of ids (one per line), or a split name: for VOC the file
        `ImageSets/Segmentation/<split>.txt`, for pairs `<root>/<split>.txt`. Raises
        FileNotFoundError for a missing split file and ValueError for an empty one or one that
        lists an id without an image and mask here.
        """
        if split is None:
            return sorted(self.images)
        path = self._split_file(split)
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"split file {path} lists no image ids")
        missing = [i for i in ids if i not in self.images]
        if missing:
            raise ValueError(f"{len(missing)} ids of {path} have no image and mask in {self.root} "
                             f"(first: {missing[0]!r}): {self._expected(missing[0])}")
        return ids

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 RGB image `[H, W, 3]`, uint8 labels `[H, W]`) of one id.

        The image is read by `fastdino.data.images.load_rgb` (as every fastdino command reads
        images). Raises ValueError for an unreadable file, a mask of another size than its
        image, or a label that is neither 255 nor below the number of class names.
        """
        from fastdino.eval.draw import load_image

        image = load_image(self.images[image_id])
        mask = read_mask(self.masks[image_id])
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {self.masks[image_id]} is {mask.shape[1]}x{mask.shape[0]} but its image "
                             f"{self.images[image_id]} is {image.shape[1]}x{image.shape[0]}: a mask must have its "
                             f"image's size")
        labels = np.unique(mask)
        unknown = labels[(labels != IGNORE_LABEL) & (labels >= self.num_classes)]
        if unknown.size:
            raise ValueError(f"mask {self.masks[image_id]} has label {int(unknown[0])} but {self.root} names "
                             f"{self.num_classes} classes (0-{self.num_classes - 1}, 255 = ignore): add a labels.txt "
                             f"with one class name per line")
        return image, mask

    def _split_file(self, split: str) -> Path:
        if Path(split).is_file():
            return Path(split)
        path = (self.root / "ImageSets" / "Segmentation" if self.layout == "voc" else self.root) / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"split {split!r} not found: neither a file nor {path}")
        return path

    def _expected(self, image_id: str) -> str:
        if self.layout == "voc":
            return f"expected JPEGImages/{image_id}.jpg and SegmentationClass/{image_id}.png"
        return f"expected images/{image_id}.jpg|png and masks/{image_id}.png"


def open_segmentation_data(root: str | Path) -> SegmentationData:
    """The images and masks of a Pascal VOC folder (JPEGImages/, SegmentationClass/) or a pairs
    folder (images/, masks/), with their class names (see the module docstring).

    Only ids with both an image and a mask are kept for VOC (JPEGImages holds detection
    images without masks too); a pairs image without its mask is an error. Raises
    FileNotFoundError when `root` is neither layout or holds no image with a mask, ValueError for
    two images of one name or an unusable labels.txt; reading every pairs mask (to count the
    classes when there is no labels.txt) raises what `read_mask` raises.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        layout = "voc"
        masks = {p.stem: p for p in (root / "SegmentationClass").glob("*.png")}
        images = {i: root / "JPEGImages" / f"{i}.jpg" for i in masks}
        images = {i: p for i, p in images.items() if p.is_file()}
        masks = {i: masks[i] for i in images}
    elif (root / "images").is_dir() and (root / "masks").is_dir():
        layout = "pairs"
        images = _images_by_stem(root / "images")
        masks = {i: root / "masks" / f"{i}.png" for i in images}
        without = sorted(i for i, p in masks.items() if not p.is_file())
        if without:
            raise FileNotFoundError(f"{len(without)} images of {root / 'images'} have no mask (first: "
                                    f"{images[without[0]].name}; expected {masks[without[0]]})")
    else:
        raise FileNotFoundError(f"{root} is neither a Pascal VOC folder (JPEGImages/ and SegmentationClass/) nor a "
                                f"pairs folder (images/ and masks/)")
    if not images:
        raise FileNotFoundError(f"no image with a mask in {root} ({layout} layout)")
    return SegmentationData(root, layout, _class_names(root, layout, masks), images, masks)


def read_mask(path: str | Path) -> np.ndarray:
    """uint8 labels `[H, W]` of a single-channel ("L"), palette ("P": the palette indices) or
    bilevel ("1": 0/1) PNG. Raises FileNotFoundError for a missing file and ValueError for an
    unreadable file or another mode (an RGB mask: save the labels as "L" or "P")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask not found: {path}")
    try:
        with Image.open(path) as mask:
            if mask.mode not in MASK_MODES:
                raise ValueError(f"mask {path} is a {mask.mode} image: masks must be single-channel (L) or palette (P) "
                                 f"PNGs whose values are the labels")
            return np.array(mask, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise ValueError(f"cannot read mask {path}: {exc}") from None


def _images_by_stem(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in images:
            raise ValueError(f"two images named {path.stem!r} in {folder} ({images[path.stem].name}, {path.name}): "
                             f"an image's name must be unique to pair it with masks/{path.stem}.png")
        images[path.stem] = path
    return images


def _class_names(root: Path, layout: str, masks: dict[str, Path]) -> tuple[str, ...]:
    labels_file = root / "labels.txt"
    if labels_file.is_file():
        names = labels_file.read_text().rstrip("\n").splitlines()
        if not names or not all(n.strip() for n in names):
            raise ValueError(f"{labels_file} must give one non-empty class name per line (line i = class i, "
                             f"background first)")
        if len(names) > IGNORE_LABEL:
            raise ValueError(f"{labels_file} names {len(names)} classes; labels stop at 254 (255 = ignore)")
        return tuple(n.strip() for n in names)
    if layout == "voc":
        return VOC_CLASSES
    from tqdm import tqdm

    largest = 0
    for path in tqdm(sorted(masks.values()), desc="counting classes", dynamic_ncols=True, leave=False):
        labels = np.unique(read_mask(path))
        labels = labels[labels != IGNORE_LABEL]
        largest = max(largest, int(labels.max()) if labels.size else 0)
    return ("background", *(f"class {c}" for c in range(1, largest + 1)))


def resize_to_patches(image: np.ndarray, size: int, patch_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as the backbone sees it: the shorter side resized (bicubic) to `size`, then the
    bottom and right cut to whole patches, as the official `visualize_attention.py` (and
    `fastdino viz attention`) do.

    Returns (uint8 `[h * p, w * p, 3]`, the resized size `(H', W')` before the cut); less than
    one patch of rows and columns (in resized pixels) is cut. Raises ValueError for a size below
    the patch size.
    """
    if size < patch_size:
        raise ValueError(f"image size {size} is smaller than the patch size {patch_size}: give a larger --size")
    height, width = image.shape[:2]
    scale = size / min(height, width)
    resized_hw = (max(patch_size, round(height * scale)), max(patch_size, round(width * scale)))
    if resized_hw != (height, width):
        image = np.asarray(Image.fromarray(image).resize(resized_hw[::-1], Image.Resampling.BICUBIC))
    grid_h, grid_w = resized_hw[0] // patch_size, resized_hw[1] // patch_size
    return np.array(image[: grid_h * patch_size, : grid_w * patch_size]), resized_hw  # a writable copy


def patch_positions(length: int, resized_length: int, patch_size: int) -> np.ndarray:
    """Where each of `length` original pixel centres falls on the patch grid, in patches
    (float64 `[length]`): pixel i's centre (i + 0.5) scaled to the resized image, divided by the
    patch size. Patch j spans [j, j + 1); its centre is j + 0.5."""
    return (np.arange(length) + 0.5) * (resized_length / length) / patch_size


def patch_label_distribution(mask: np.ndarray, resized_hw: tuple[int, int], patch_size: int,
                             num_classes: int) -> np.ndarray:
    """The labels of the pixels each patch covers: float32 `[h * w, num_classes]`, row-major
    patches of the grid that `resize_to_patches` gives, each row the fraction of the patch's
    labelled pixels in each class (a Hummingbird-style soft label, Balazevic et al. 2023).

    Pixels are assigned to the patch their centre falls in (mask at its own resolution, no
    resampling); 255 (ignore) pixels and the pixels cut at the bottom/right border count for
    nothing, so a patch without labelled pixels gets an all-zero row.
    """
    grid_h, grid_w = resized_hw[0] // patch_size, resized_hw[1] // patch_size
    rows = np.floor(patch_positions(mask.shape[0], resized_hw[0], patch_size)).astype(np.int64)
    cols = np.floor(patch_positions(mask.shape[1], resized_hw[1], patch_size)).astype(np.int64)
    inside = (rows < grid_h)[:, None] & (cols < grid_w)[None, :] & (mask != IGNORE_LABEL)
    patch = rows[:, None] * grid_w + cols[None, :]
    counts = np.bincount(patch[inside] * num_classes + mask[inside].astype(np.int64),
                         minlength=grid_h * grid_w * num_classes).reshape(grid_h * grid_w, num_classes)
    totals = counts.sum(axis=1, keepdims=True)
    return (counts / np.maximum(totals, 1)).astype(np.float32)
