"""Shared fixtures: a small real data set (scikit-learn digits) as .beton files.

Tests marked `fresh_process` are skipped in the main session and run by a test that starts a
new interpreter for them (FASTDINO_FRESH_PROCESS=1): after hundreds of tests, one process holds
FFCV loader threads that earlier tests left waiting and numba dispatchers that many loaders have
specialised, and a fork of it (FFCV's writer processes) or a new loader's JIT compile can hang.
"""
from __future__ import annotations

import os

import pytest

FRESH_PROCESS = os.environ.get("FASTDINO_FRESH_PROCESS") == "1"


def pytest_collection_modifyitems(config, items):
    if FRESH_PROCESS:
        return
    for item in items:
        if item.get_closest_marker("fresh_process"):
            item.add_marker(pytest.mark.skip(reason="runs in a fresh interpreter (see conftest.py)"))


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


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group in this process (the collective of the ZeRO path), removed after."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
