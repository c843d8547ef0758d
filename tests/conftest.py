"""Shared fixtures: a small real data set (scikit-learn digits) as .beton files."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_betons(tmp_path_factory):
    """(train.beton, val.beton) of 16-px digits, written once per test session."""
    from fastdino.data import convert_folder
    from fastdino.data.sample_data import write_digits_folders

    root = tmp_path_factory.mktemp("digits")
    train_dir, val_dir = write_digits_folders(root / "images", size=16, val_fraction=0.25, seed=0)
    train, val = root / "train.beton", root / "val.beton"
    convert_folder(train_dir, train, max_resolution=16, num_workers=1, progress=False)
    convert_folder(val_dir, val, max_resolution=16, num_workers=1, progress=False)
    return train, val
