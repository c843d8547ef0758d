"""`fastdino data scenes OUT`: evaluation data with exact ground truth, generated from pictures
that ship inside installed packages (scikit-image's photos and textures, scikit-learn's digits),
so that every evaluation command can be tried without downloading anything.

Under OUT it writes, each in the layout the evaluation commands read for the real data set:

- `voc/` (Pascal VOC 2012 segmentation layout) and `pairs/` (images/ + masks/): scenes made of
  a photo background with 1-3 pasted objects. An object's class is its fill (a tinted
  scikit-image texture, or a patch of fur or stained tissue); its outline is drawn at random
  (an upscaled, smoothed scikit-learn digit, an ellipse or a polygon), so the outline says
  nothing about the class. Objects are pasted without blending, so a pixel's label is exactly
  the object (or background) whose colour it holds.
- `davis/` (DAVIS-2017 layout): short videos of 1-2 such objects moving and changing scale over
  a panning photo background, with per-frame object-id masks.
- `oxford/` (revisited Oxford/Paris layout, Radenovic et al. 2018, github.com/filipradenovic/
  revisitop): instances (distinct photos) seen in database images under mild (easy) and strong
  (hard) crops and colour changes, tiny barely visible copies (junk) and distractors; queries
  show the whole instance in a box (`bbx`) on another background. Ground truth in
  `gnd_synth.pkl`.
- `instances/`: the easy and hard views of each instance as `<instance>/<image>.jpg`.

Every random choice comes from a generator seeded by (seed, part, index), so the output is the
same for a seed whatever the other options, and scene i does not change with `--count`.
"""
from __future__ import annotations

import argparse
import functools
import io
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# Object classes of voc/ and pairs/ (label i+1 = CLASSES[i]; 0 is background): the scikit-image
# picture that fills the object, and the RGB tint given to the grayscale textures.
CLASSES = ("brick", "grass", "gravel", "fur", "tissue")
CLASS_FILLS = {
    "brick": ("brick", (0.85, 0.45, 0.32)),
    "grass": ("grass", (0.40, 0.75, 0.28)),
    "gravel": ("gravel", (0.55, 0.62, 0.80)),
    "fur": ("chelsea", None),
    "tissue": ("immunohistochemistry", None),
}
# Scene and video backgrounds: photos that fill no object class.
BACKGROUND_PHOTOS = ("astronaut", "rocket", "coffee", "motorcycle", "camera", "coins", "hubble_deep_field", "moon")
# Retrieval instances, in this order (--instances takes the first K); the rest become distractors.
INSTANCE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "immunohistochemistry", "retina",
                   "colorwheel", "camera", "coins", "hubble_deep_field", "clock")
DISTRACTOR_PICTURES = ("brick", "grass", "gravel", "moon", "page", "text", "cell")

# Parts of the output, each with its own random stream.
SCENE_STREAM, VIDEO_STREAM, RETRIEVAL_STREAM = 0, 1, 2
# Pascal VOC marks a band about 5 px wide along every object outline as 255 ("void"): here, the
# pixels within 2 px of a label change (a 2-px boundary on both sides, dilated by 1).
VOC_IGNORE = 255
RING_RADIUS = 1
JPEG_QUALITY = 95
# Retrieval views per instance, and what each query's ground truth lists.
EASY_VIEWS, HARD_VIEWS, JUNK_VIEWS, QUERIES_PER_INSTANCE, DISTRACTORS_PER_INSTANCE = 3, 3, 1, 2, 2
OUTPUT_PARTS = ("voc", "pairs", "davis", "oxford", "instances", "README.txt")


@dataclass
class PastedObject:
    """One object pasted into a picture: its label (class, or object id in videos), its place
    (`top`, `left` of its box, in pixels), `mask` `[h, w]` bool and `pixels` `[h, w, 3]` uint8
    (the fill; only the pixels under the mask are pasted)."""
    label: int
    top: int
    left: int
    mask: np.ndarray
    pixels: np.ndarray


@dataclass
class Scene:
    """A generated picture and its exact ground truth: `image` `[H, W, 3]` uint8, `labels`
    `[H, W]` uint8 (0 = background), the `background` `[H, W, 3]` it was pasted on and the
    `objects` in paste order (a later object covers an earlier one)."""
    image: np.ndarray
    labels: np.ndarray
    background: np.ndarray
    objects: list[PastedObject] = field(default_factory=list)


@dataclass
class RetrievalSet:
    """A revisited-Oxford-style set: database `images` {name: uint8 `[H, W, 3]`} listed in
    `imlist` order, `queries` {name: uint8 image} in `qimlist` order, `gnd` (one dict per query,
    as revisitop's pickle: `bbx` [x1, y1, x2, y2], `easy`, `hard`, `junk` index lists into
    imlist), `instance_of` {database name: instance, or None for a distractor}, `query_instance`
    {query name: instance} and `query_pixels` {query name: the instance picture pasted at bbx}."""
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]
    images: dict[str, np.ndarray]
    queries: dict[str, np.ndarray]
    instance_of: dict[str, str | None]
    query_instance: dict[str, str]
    query_pixels: dict[str, np.ndarray]


def voc_palette() -> list[int]:
    """The 256-colour Pascal VOC palette as 768 ints (R, G, B per index), built by the bit
    interleaving of the VOC devkit's `labelcolormap.m`; DAVIS-2017 masks use the same palette."""
    palette = []
    for index in range(256):
        red = green = blue = 0
        value = index
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [red, green, blue]
    return palette


def ignore_ring(labels: np.ndarray, radius: int = RING_RADIUS) -> np.ndarray:
    """bool `[H, W]`: the pixels Pascal VOC would mark 255 in `labels` `[H, W]`: those on either
    side of a change of label (background/object or object/object), dilated by a disk of
    `radius` px (about 2 + 2·radius px wide in all). The picture's own edge is not a boundary."""
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk
    from skimage.segmentation import find_boundaries

    boundaries = find_boundaries(labels, connectivity=1, mode="thick")
    return binary_dilation(boundaries, structure=disk(radius)) if radius else boundaries


@functools.cache
def _picture(name: str) -> np.ndarray:
    """uint8 `[H, W, 3]` of a picture bundled with scikit-image (grayscale ones repeated over
    RGB, the alpha of RGBA ones dropped); "motorcycle" is the left view of the stereo pair."""
    import skimage.data

    picture = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    if picture.ndim == 2:
        picture = np.repeat(picture[:, :, None], 3, axis=2)
    return np.ascontiguousarray(picture[:, :, :3], dtype=np.uint8)


@functools.cache
def _digits() -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits as float `[N, 8, 8]` in [0, 1]."""
    from sklearn.datasets import load_digits

    return load_digits().images / 16.0


def _resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 `[height, width, 3]`: `pixels` resized bilinearly (PIL, antialiased when shrinking)."""
    return np.array(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))


def _resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool `[height, width]`: the coverage of `mask` resized bilinearly, thresholded at 1/2."""
    coverage = Image.fromarray(mask.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(coverage) > 0.5


def _random_crop(rng: np.random.Generator, picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """A box of `height` x `width` (clipped to the picture) at a random place in `picture`."""
    height, width = min(height, picture.shape[0]), min(width, picture.shape[1])
    top = int(rng.integers(0, picture.shape[0] - height + 1))
    left = int(rng.integers(0, picture.shape[1] - width + 1))
    return picture[top:top + height, left:left + width]


def _crop_resized(rng: np.random.Generator, picture: np.ndarray, height: int, width: int,
                  min_fraction: float, max_fraction: float) -> np.ndarray:
    """A random crop of `picture` with the aspect of height x width, covering a fraction in
    [min_fraction, max_fraction] of the largest such box, resized to height x width."""
    fit = min(picture.shape[0] / height, picture.shape[1] / width)
    fraction = rng.uniform(min_fraction, max_fraction)
    crop = _random_crop(rng, picture, max(1, round(height * fit * fraction)), max(1, round(width * fit * fraction)))
    return _resize(crop, height, width)


def _scale_colours(pixels: np.ndarray, gains) -> np.ndarray:
    """uint8: `pixels` times `gains` (a number or one per channel), rounded and clipped."""
    return np.clip(np.round(pixels.astype(np.float32) * np.asarray(gains, np.float32)), 0, 255).astype(np.uint8)


def random_shape(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """bool `[height, width]`, touching all four sides of the box: an object outline,
    half the time a random scikit-learn digit upscaled bicubically, smoothed and thresholded,
    else an ellipse or a star-like polygon, rotated at random. Covers at least 20% of its box."""
    from scipy.ndimage import gaussian_filter, zoom
    from skimage.draw import ellipse, polygon

    while True:
        kind = rng.choice(["digit", "digit", "ellipse", "polygon"])
        if kind == "digit":
            digits = _digits()
            digit = np.pad(digits[rng.integers(len(digits))], 1)  # a margin keeps strokes off the box edge
            coverage = zoom(digit, (height / digit.shape[0], width / digit.shape[1]), order=3, grid_mode=True,
                            mode="grid-constant")
            mask = gaussian_filter(coverage, sigma=0.03 * min(height, width)) > 0.4
        elif kind == "ellipse":
            mask = np.zeros((height, width), bool)
            rows, cols = ellipse(height / 2, width / 2, height * rng.uniform(0.3, 0.5), width * rng.uniform(0.3, 0.5),
                                 shape=mask.shape, rotation=rng.uniform(-np.pi, np.pi))
            mask[rows, cols] = True
        else:
            corners = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * np.pi, corners)) if corners > 4 else \
                np.linspace(0, 2 * np.pi, corners, endpoint=False) + rng.uniform(0, np.pi)
            radii = rng.uniform(0.55, 1.0, corners)
            mask = np.zeros((height, width), bool)
            rows, cols = polygon(height / 2 + radii * np.sin(angles) * height / 2,
                                 width / 2 + radii * np.cos(angles) * width / 2, shape=mask.shape)
            mask[rows, cols] = True
        if not mask.any():
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        # Stretched back to the box asked for: a digit fills only the middle of its 8x8 grid.
        mask = _resize_mask(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], height, width)
        if mask.mean() >= 0.2:
            return mask


def class_fill(rng: np.random.Generator, class_name: str, height: int, width: int) -> np.ndarray:
    """uint8 `[height, width, 3]`: the fill of an object of `class_name` (one of CLASSES): a
    random crop of its picture at a random scale (0.6x to 1.4x), tinted (grayscale textures) and
    brightened or darkened by up to 15%."""
    source, tint = CLASS_FILLS[class_name]
    picture = _picture(source)
    scale = rng.uniform(0.6, 1.4)
    patch = _random_crop(rng, picture, round(height / scale), round(width / scale))
    patch = _resize(patch, height, width)
    gains = rng.uniform(0.85, 1.15) * (np.asarray(tint) * rng.uniform(0.92, 1.08, 3) if tint else np.ones(3))
    return _scale_colours(patch, gains)


def _paste(image: np.ndarray, labels: np.ndarray, item: PastedObject) -> None:
    """Writes the object's pixels and label under its mask, in place."""
    h, w = item.mask.shape
    region = (slice(item.top, item.top + h), slice(item.left, item.left + w))
    image[region][item.mask] = item.pixels[item.mask]
    labels[region][item.mask] = item.label


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop (30% to 100% of the largest box of this aspect) of a background photo."""
    photo = _picture(BACKGROUND_PHOTOS[rng.integers(len(BACKGROUND_PHOTOS))])
    return _crop_resized(rng, photo, height, width, 0.3, 1.0)


def make_scene(seed: int, index: int, size: int) -> Scene:
    """Scene `index` of `seed`: a `size` x `size` background photo crop with 1-3 objects of
    random classes (labels 1..len(CLASSES)), each box 25% to 55% of the side, pasted at random
    places (they may overlap: the later one is on top). Deterministic in (seed, index, size)."""
    rng = np.random.default_rng([seed, SCENE_STREAM, index])
    background = _background(rng, size, size)
    scene = Scene(background.copy(), np.zeros((size, size), np.uint8), background)
    for _ in range(int(rng.integers(1, 4))):
        label = int(rng.integers(1, len(CLASSES) + 1))
        mask = random_shape(rng, *(int(side) for side in rng.integers(round(0.25 * size), round(0.55 * size) + 1, 2)))
        h, w = mask.shape
        item = PastedObject(label, int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), mask,
                            class_fill(rng, CLASSES[label - 1], h, w))
        _paste(scene.image, scene.labels, item)
        scene.objects.append(item)
    return scene


def make_video(seed: int, index: int, width: int, height: int, frames: int) -> list[Scene]:
    """Video `index` of `seed`: `frames` Scenes of `width` x `height` with 2 objects (even
    `index`) or 1 (odd), ids 1..n, of distinct classes, outline and fill fixed for the video,
    moving in straight lines from non-overlapping places in frame 0 and changing scale linearly
    by up to 20%, over a photo background whose view pans by up to 10% of the frame. Objects
    stay inside the frame; the higher id is on top. Deterministic in its arguments."""
    rng = np.random.default_rng([seed, VIDEO_STREAM, index])
    margin = (round(0.1 * height), round(0.1 * width))
    canvas = _background(rng, height + 2 * margin[0], width + 2 * margin[1])
    pan_start, pan_end = (rng.integers(0, 2 * np.asarray(margin) + 1, 2) for _ in range(2))
    n_objects = 2 if index % 2 == 0 else 1
    sprites, tracks = [], []
    for object_id, class_index in enumerate(rng.choice(len(CLASSES), n_objects, replace=False), start=1):
        end_scale = rng.uniform(0.8, 1.2)
        # Sized so that at its largest it fits its share of the width, which keeps frame 0 overlap-free.
        largest = min(0.7 * height, 0.9 * width / n_objects) / max(1.0, end_scale)
        mask = random_shape(rng, *(int(side) for side in rng.integers(round(0.6 * largest), round(largest) + 1, 2)))
        h, w = mask.shape
        sprites.append((object_id, mask, class_fill(rng, CLASSES[class_index], h, w)))
        big_h, big_w = round(h * max(1.0, end_scale)), round(w * max(1.0, end_scale))
        share = width // n_objects  # frame 0: object i starts inside the i-th vertical strip
        start = (rng.integers(0, height - big_h + 1),
                 rng.integers(share * (object_id - 1), share * object_id - big_w + 1))
        end = (rng.integers(0, height - big_h + 1), rng.integers(0, width - big_w + 1))
        tracks.append((np.asarray(start, float), np.asarray(end, float), end_scale))
    video = []
    for t in range(frames):
        alpha = t / max(1, frames - 1)
        top, left = np.round((1 - alpha) * pan_start + alpha * pan_end).astype(int)
        background = canvas[top:top + height, left:left + width].copy()
        scene = Scene(background.copy(), np.zeros((height, width), np.uint8), background)
        for (object_id, mask, pixels), (start, end, end_scale) in zip(sprites, tracks):
            scale = 1 + alpha * (end_scale - 1)
            h, w = max(1, round(mask.shape[0] * scale)), max(1, round(mask.shape[1] * scale))
            top, left = np.round((1 - alpha) * start + alpha * end).astype(int)
            item = PastedObject(object_id, int(top), int(left), _resize_mask(mask, h, w), _resize(pixels, h, w))
            _paste(scene.image, scene.labels, item)
            scene.objects.append(item)
        video.append(scene)
    return video


def _strong_colour_change(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """One of: grayscale at lower contrast, dusk (dark, blue), warm (gamma 0.6, orange), faded."""
    values = pixels.astype(np.float32) / 255
    change = rng.integers(4)
    if change == 0:
        grey = values @ np.asarray([0.299, 0.587, 0.114], np.float32)
        values = np.repeat((0.5 + rng.uniform(0.55, 0.75) * (grey - 0.5))[:, :, None], 3, axis=2)
    elif change == 1:
        values = values * rng.uniform(0.35, 0.5) * np.asarray([0.8, 0.85, 1.15], np.float32)
    elif change == 2:
        values = values ** 0.6 * np.asarray([1.15, 1.0, 0.7], np.float32)
    else:
        values = values.mean() + rng.uniform(0.35, 0.5) * (values - values.mean())
    return np.clip(np.round(values * 255), 0, 255).astype(np.uint8)


def _view_shape(rng: np.random.Generator, side: int) -> tuple[int, int]:
    """(height, width) of a landscape (3 in 4) or portrait picture whose longer side is `side`."""
    short = round(side * 0.75)
    return (short, side) if rng.random() < 0.75 else (side, short)


def _instance_view(rng: np.random.Generator, photo: np.ndarray, kind: str, size: int,
                   distractors: Sequence[str]) -> np.ndarray:
    """One database picture of an instance photo: `easy` (75-100% crop, +-10% colour), `hard`
    (35-55% crop blown up, strong colour change) or `junk` (the whole photo at 12-18% of the side,
    blended 50/50 into a distractor picture: barely visible)."""
    height, width = _view_shape(rng, size)
    if kind == "easy":
        view = _crop_resized(rng, photo, height, width, 0.75, 1.0)
        return _scale_colours(view, rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3))
    if kind == "hard":
        return _strong_colour_change(rng, _crop_resized(rng, photo, height, width, 0.35, 0.55))
    view = _crop_resized(rng, _picture(distractors[rng.integers(len(distractors))]), height, width, 0.4, 1.0)
    scale = rng.uniform(0.12, 0.18) * size / max(photo.shape[:2])
    h, w = max(1, round(photo.shape[0] * scale)), max(1, round(photo.shape[1] * scale))
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    region = view[top:top + h, left:left + w]
    region[:] = ((region.astype(np.uint16) + _resize(photo, h, w)) // 2).astype(np.uint8)
    return view


def _check_instances(n_instances: int) -> None:
    if not 2 <= n_instances <= len(INSTANCE_PHOTOS):
        raise ValueError(f"--instances must be between 2 and {len(INSTANCE_PHOTOS)} (one per bundled photo), "
                         f"got {n_instances}")


def make_retrieval_set(seed: int, size: int, n_instances: int) -> RetrievalSet:
    """The retrieval set of `seed`: the first `n_instances` of INSTANCE_PHOTOS, each with
    EASY_VIEWS easy, HARD_VIEWS hard and JUNK_VIEWS junk database pictures (longer side `size`)
    and QUERIES_PER_INSTANCE queries (the whole photo at 55-75% of the side, pasted on a
    distractor picture: `bbx` is its box, PIL crop convention, x2 and y2 exclusive), plus
    DISTRACTORS_PER_INSTANCE distractors per instance from pictures that are no instance.
    Database order is shuffled. Raises ValueError for n_instances outside 2..len(INSTANCE_PHOTOS)."""
    _check_instances(n_instances)
    rng = np.random.default_rng([seed, RETRIEVAL_STREAM])
    instances = INSTANCE_PHOTOS[:n_instances]
    distractors = DISTRACTOR_PICTURES + INSTANCE_PHOTOS[n_instances:]
    images, instance_of, kinds = {}, {}, {}
    for instance in instances:
        views = ["easy"] * EASY_VIEWS + ["hard"] * HARD_VIEWS + ["junk"] * JUNK_VIEWS
        for number, view_index in enumerate(rng.permutation(len(views))):
            name = f"{instance}_{number:03d}"
            images[name] = _instance_view(rng, _picture(instance), views[view_index], size, distractors)
            instance_of[name], kinds[name] = instance, views[view_index]
    for number in range(DISTRACTORS_PER_INSTANCE * n_instances):
        name = f"distractor_{number:03d}"
        picture = _picture(distractors[rng.integers(len(distractors))])
        images[name] = _scale_colours(_crop_resized(rng, picture, *_view_shape(rng, size), 0.4, 1.0),
                                      rng.uniform(0.9, 1.1) * rng.uniform(0.95, 1.05, 3))
        instance_of[name] = None
    imlist = [list(images)[i] for i in rng.permutation(len(images))]
    queries, gnd, query_instance, query_pixels = {}, [], {}, {}
    for instance in instances:
        photo = _picture(instance)
        positives = {kind: [i for i, name in enumerate(imlist) if instance_of[name] == instance and kinds[name] == kind]
                     for kind in ("easy", "hard", "junk")}
        for number in range(QUERIES_PER_INSTANCE):
            name = f"query_{instance}_{number}"
            height, width = _view_shape(rng, size)
            canvas = _crop_resized(rng, _picture(distractors[rng.integers(len(distractors))]), height, width, 0.4, 1.0)
            scale = min(height, width) * rng.uniform(0.55, 0.75) / max(photo.shape[:2])
            h, w = max(1, round(photo.shape[0] * scale)), max(1, round(photo.shape[1] * scale))
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            query_pixels[name] = _resize(photo, h, w)
            canvas[top:top + h, left:left + w] = query_pixels[name]
            queries[name], query_instance[name] = canvas, instance
            gnd.append({"bbx": [float(left), float(top), float(left + w), float(top + h)], **positives})
    return RetrievalSet(imlist, list(queries), gnd, {name: images[name] for name in imlist}, queries, instance_of,
                        query_instance, query_pixels)


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _save_png(labels: np.ndarray, path: Path, palette: list[int]) -> None:
    """Writes uint8 `labels` as a palette ("P") PNG."""
    image = Image.fromarray(labels)
    image.putpalette(palette)  # an "L" image with a palette becomes "P", indices unchanged
    image.save(path)


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Creates OUT, or empties what this command writes there (--overwrite). Raises
    FileExistsError for a non-empty OUT without overwrite, NotADirectoryError for a file."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder: give a new or empty folder as OUT")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty: give a new or empty folder, or pass --overwrite to replace "
                                  f"{', '.join(OUTPUT_PARTS)} in it")
        for part in OUTPUT_PARTS:
            target = out / part
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _readme(count: int, n_val: int, size: int, videos: int, frames: int, video_size: tuple[int, int],
            n_instances: int, seed: int) -> str:
    """OUT/README.txt: what each folder holds and how it was made."""
    labels = ", ".join(f"{i} {name}" for i, name in enumerate(("background",) + CLASSES))
    n_distractors = DISTRACTORS_PER_INSTANCE * n_instances
    return f"""Generated by `fastdino data scenes` (seed {seed}) from pictures bundled with scikit-image and
scikit-learn's digits: nothing was downloaded. Every mask is exact: objects are pasted without
blending, so a pixel's label is the object (or background) whose colour it holds.

voc/        Pascal VOC 2012 segmentation layout: {count} scenes of {size}x{size} (JPEGImages/*.jpg,
            SegmentationClass/*.png palette PNGs, ImageSets/Segmentation/train.txt ({count - n_val})
            and val.txt ({n_val})). A scene is a random crop of a photo with 1-3 pasted objects
            (boxes of 25-55% of the side; they may overlap). An object's class is its fill, a tinted
            texture or a patch of a photo; its outline (a smoothed scikit-learn digit, an ellipse
            or a polygon) is random and says nothing about the class.
            labels.txt: {labels}.
            As in VOC, a band about {2 + 2 * RING_RADIUS} px wide along every object outline is 255 (ignore).
pairs/      The same scenes: images/*.png (lossless: the exact pixels, while voc/ holds JPEGs) and
            masks/*.png, exact labels without the ignore band. The first {count - n_val} sorted names are
            voc's train split, the rest its val split (also in train.txt, val.txt). Same labels.txt.
davis/      DAVIS-2017 layout: {videos} videos of {frames} frames at {video_size[0]}x{video_size[1]} (JPEGImages/480p/
            <video>/NNNNN.jpg, Annotations/480p/<video>/NNNNN.png with object ids 1..n on the DAVIS
            palette, ImageSets/2017/val.txt). 2 objects (even-numbered videos) or 1 (odd), of
            different classes, move in straight lines and change scale by up to 20% over a
            panning photo; they are apart in frame 0.
oxford/     Revisited Oxford/Paris layout: jpg/*.jpg and gnd_synth.pkl ({{"imlist", "qimlist", "gnd"}},
            gnd[i] = {{"bbx": [x1, y1, x2, y2], "easy", "hard", "junk": indices into imlist}}).
            {n_instances} instances (distinct photos), each in {EASY_VIEWS} easy views (75-100% crops, +-10% colour),
            {HARD_VIEWS} hard views (35-55% crops, strong colour change) and {JUNK_VIEWS} junk view (a tiny copy
            blended into another picture); {n_distractors} distractors; {QUERIES_PER_INSTANCE} queries per
            instance showing the whole photo at bbx on another picture (crop the query to bbx).
instances/  <instance>/<image>.jpg: the easy and hard views of each oxford instance (same files).
"""


def write_scenes(out: str | Path, *, count: int = 60, size: int = 224, videos: int = 3, frames: int = 12,
                 video_size: tuple[int, int] = (256, 144), instances: int = 6, seed: int = 0,
                 overwrite: bool = False, progress: bool = True) -> list[str]:
    """Writes voc/, pairs/, davis/, oxford/, instances/ and README.txt under `out` (see the
    module docstring) and returns one summary line per folder. `count` scenes of `size` px (the
    last count // 3, at least 1, are val), `videos` videos of `frames` frames of `video_size`
    (width, height), `instances` retrieval instances (longer side `size`). Raises ValueError for
    out-of-range options, FileExistsError for a non-empty `out` without `overwrite`."""
    if count < 2:
        raise ValueError(f"--count must be at least 2 (one train and one val scene), got {count}")
    if size < 48:
        raise ValueError(f"--size must be at least 48 px, got {size}")
    if videos < 1 or frames < 2:
        raise ValueError(f"--videos must be at least 1 and --frames at least 2, got {videos} and {frames}")
    if min(video_size) < 32:
        raise ValueError(f"--video-size must be at least 32x32, got {video_size[0]}x{video_size[1]}")
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")
    _check_instances(instances)
    from tqdm import tqdm

    out = Path(out)
    _prepare_output(out, overwrite)
    palette = voc_palette()
    n_val = max(1, count // 3)
    n_images = count + videos * frames + instances * (EASY_VIEWS + HARD_VIEWS + JUNK_VIEWS + DISTRACTORS_PER_INSTANCE
                                                      + QUERIES_PER_INSTANCE)
    bar = tqdm(total=n_images, desc="scenes", unit="img", dynamic_ncols=True, leave=False, file=sys.stderr,
               disable=not progress)

    voc, pairs = out / "voc", out / "pairs"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation",
                   pairs / "images", pairs / "masks"):
        folder.mkdir(parents=True)
    label_names = "".join(f"{name}\n" for name in ("background",) + CLASSES)
    ids = [f"scene_{i:04d}" for i in range(count)]
    for i, scene_id in enumerate(ids):
        scene = make_scene(seed, i, size)
        (voc / "JPEGImages" / f"{scene_id}.jpg").write_bytes(_jpeg_bytes(scene.image))
        _save_png(np.where(ignore_ring(scene.labels), VOC_IGNORE, scene.labels).astype(np.uint8),
                  voc / "SegmentationClass" / f"{scene_id}.png", palette)
        Image.fromarray(scene.image).save(pairs / "images" / f"{scene_id}.png")
        _save_png(scene.labels, pairs / "masks" / f"{scene_id}.png", palette)
        bar.update()
    # pairs/ gets the split files too (`eval segment --train-split train` reads <root>/train.txt there).
    for split_dir in (voc / "ImageSets" / "Segmentation", pairs):
        (split_dir / "train.txt").write_text("".join(f"{i}\n" for i in ids[:count - n_val]))
        (split_dir / "val.txt").write_text("".join(f"{i}\n" for i in ids[count - n_val:]))
    for folder in (voc, pairs):
        (folder / "labels.txt").write_text(label_names)

    davis = out / "davis"
    names = [f"synth-{v:02d}" for v in range(videos)]
    n_objects = []
    for v, name in enumerate(names):
        frames_dir, masks_dir = davis / "JPEGImages" / "480p" / name, davis / "Annotations" / "480p" / name
        frames_dir.mkdir(parents=True)
        masks_dir.mkdir(parents=True)
        video = make_video(seed, v, *video_size, frames)
        n_objects.append(len(video[0].objects))
        for t, scene in enumerate(video):
            (frames_dir / f"{t:05d}.jpg").write_bytes(_jpeg_bytes(scene.image))
            _save_png(scene.labels, masks_dir / f"{t:05d}.png", palette)
            bar.update()
    (davis / "ImageSets" / "2017").mkdir(parents=True)
    (davis / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{name}\n" for name in names))

    retrieval = make_retrieval_set(seed, size, instances)
    oxford_jpg = out / "oxford" / "jpg"
    oxford_jpg.mkdir(parents=True)
    positives = {retrieval.imlist[i] for entry in retrieval.gnd for i in entry["easy"] + entry["hard"]}
    for name, image in [*retrieval.images.items(), *retrieval.queries.items()]:
        encoded = _jpeg_bytes(image)
        (oxford_jpg / f"{name}.jpg").write_bytes(encoded)
        if name in positives:
            folder = out / "instances" / retrieval.instance_of[name]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.jpg").write_bytes(encoded)
        bar.update()
    with open(out / "oxford" / "gnd_synth.pkl", "wb") as file:
        pickle.dump({"imlist": retrieval.imlist, "qimlist": retrieval.qimlist, "gnd": retrieval.gnd}, file)
    bar.close()
    (out / "README.txt").write_text(_readme(count, n_val, size, videos, frames, video_size, instances, seed))

    n_distractors = sum(instance is None for instance in retrieval.instance_of.values())
    n_instance_images = sum(1 for _ in (out / "instances").glob("*/*.jpg"))
    return [
        f"{voc}: {count} scenes of {size}x{size} ({count - n_val} train, {n_val} val), {len(CLASSES)} classes + "
        f"background (labels.txt), 255 on a band along object outlines",
        f"{pairs}: the same {count} scenes as images/*.png + masks/*.png without the ignore band; the first "
        f"{count - n_val} sorted names are the train split (train.txt, val.txt)",
        f"{davis}: {videos} videos of {frames} frames at {video_size[0]}x{video_size[1]}, "
        f"{sum(n_objects)} objects in all (ImageSets/2017/val.txt)",
        f"{out / 'oxford'}: {instances} instances, {len(retrieval.imlist)} database images ({n_distractors} "
        f"distractors), {len(retrieval.qimlist)} queries; ground truth in gnd_synth.pkl",
        f"{out / 'instances'}: {instances} instance folders, {n_instance_images} images",
    ]


def _video_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x144, got {text!r}") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdino data scenes", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes evaluation data with exact ground truth, generated from pictures bundled with "
                    "scikit-image\nand scikit-learn (nothing is downloaded), in the layouts the evaluation commands "
                    "read:\n"
                    "  OUT/voc        Pascal VOC segmentation: scenes with pasted objects of 5 classes "
                    "(`eval segment`)\n"
                    "  OUT/pairs      the same scenes as images/ + masks/, without VOC's ignore band "
                    "(`eval segment`,\n                 `eval attention-masks`)\n"
                    "  OUT/davis      DAVIS-2017: short videos of moving objects (`eval video`)\n"
                    "  OUT/oxford     revisited Oxford: instances, distractors, queries, gnd_synth.pkl "
                    "(`eval retrieval`)\n"
                    "  OUT/instances  the same instances as <instance>/<image>.jpg folders (`eval retrieval`)\n"
                    "OUT/README.txt says how each was made. The output depends only on the options.")
    parser.add_argument("out", metavar="OUT", help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--count", type=int, default=60,
                        help="scenes in voc/ and pairs/; the last third (at least 1) are val (default 60)")
    parser.add_argument("--size", type=int, default=224,
                        help="side of the scenes and longer side of the retrieval images, px (default 224)")
    parser.add_argument("--videos", type=int, default=3, help="videos in davis/ (default 3)")
    parser.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    parser.add_argument("--video-size", type=_video_size, default=(256, 144), metavar="WxH",
                        help="frame size (default 256x144; DAVIS 480p is 854x480)")
    parser.add_argument("--instances", type=int, default=6,
                        help=f"retrieval instances, 2 to {len(INSTANCE_PHOTOS)} (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace voc/, pairs/, davis/, oxford/, instances/ and README.txt in a non-empty OUT "
                             "(other files there are kept)")
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino data scenes OUT ...`: writes the folders and prints one line per folder."""
    args = build_parser().parse_args(argv)
    for line in write_scenes(args.out, count=args.count, size=args.size, videos=args.videos, frames=args.frames,
                             video_size=args.video_size, instances=args.instances, seed=args.seed,
                             overwrite=args.overwrite):
        print(line)
    return 0
