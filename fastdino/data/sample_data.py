"""Small data sets that ship with scikit-learn and scikit-image, for the demo and the tests.

Nothing is downloaded: the digits and the photos are inside the installed packages.
"""
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def write_digits_folders(out_dir, size=32, val_fraction=0.25, seed=0):
    """Writes scikit-learn's 1,797 8x8 digits as size x size RGB PNGs, in out_dir/{train,val}/<digit>/.

    The split is stratified by digit and seeded. The 0..16 ink levels are scaled to
    0..255 and upscaled bicubically. out_dir/train and out_dir/val are replaced.
    Returns (train_dir, val_dir).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_ids, val_ids = train_test_split(np.arange(len(pixels)), test_size=val_fraction,
                                          stratify=digits.target, random_state=seed)
    out_dir = Path(out_dir)
    split_dirs = []
    for split, ids in (("train", train_ids), ("val", val_ids)):
        split_dir = out_dir / split
        shutil.rmtree(split_dir, ignore_errors=True)
        for i in sorted(ids):
            class_dir = split_dir / str(digits.target[i])
            class_dir.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            image.save(class_dir / f"{i:04d}.png")
        split_dirs.append(split_dir)
    logger.info("wrote %d train and %d val digits (%dx%d) under %s", len(train_ids), len(val_ids), size, size, out_dir)
    return tuple(split_dirs)


def sample_photos():
    """{name: uint8 [H, W, 3]} of a few colour photos bundled with scikit-image."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in SAMPLE_PHOTOS}
