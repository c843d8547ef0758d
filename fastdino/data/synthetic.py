"""Synthetic multi-crop batches (`data.path=synthetic`): random crops made on the device, no files.

For throughput measurements and checks of the training step where no data set, or no
FFCV, is at hand (a bare GPU machine): the step sees the shapes, dtype and device of
real multi-crop batches at no loading cost. Pixels are standard-normal, about the
range of ImageNet-normalised crops. Batch b of epoch e on rank r comes from a
generator seeded by (seed, e, b, r) alone, as in the .beton loader, so runs are
reproducible and resume exactly.
"""
from __future__ import annotations

import torch

from fastdino.data.recipe import seeded_generator

SYNTHETIC = "synthetic"
IMAGENET_TRAIN_IMAGES = 1_281_167  # one synthetic epoch: schedules and ETAs are those of an ImageNet-1k run


class SyntheticMultiCrop:
    """The interface of `fastdino.data.MultiCropLoader` over random crops.

    Yields `(crops, labels)`: crops the official list [global1, global2, local1, ...], each
    `[B, 3, size, size]` of `dtype` on `device`; labels long `[B]`, all -1 (unlabelled).
    An epoch holds `num_images` images split over `world_size` ranks (drop_last).
    """

    def __init__(self, batch_size: int, *, n_local_crops: int = 8, global_size: int = 224, local_size: int = 96,
                 device: str | torch.device = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, num_images: int = IMAGENET_TRAIN_IMAGES):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size <= 0 or num_images < batch_size * world_size:
            raise ValueError(f"synthetic data: {num_images} images make no full batch of {batch_size} "
                             f"on each of {world_size} ranks")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device, self.dtype = torch.device(device), dtype
        self.sizes = [global_size] * 2 + [local_size] * n_local_crops
        self._num_images = num_images
        self.epoch = 0

    @property
    def num_images(self) -> int:
        """Images in one epoch (all ranks together)."""
        return self._num_images

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._num_images // (self.world_size * self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch: int, start_batch: int = 0):
        """Batches start_batch, start_batch + 1, ... of epoch `epoch`, each the same as in a full run."""
        labels = torch.full((self.batch_size,), -1, dtype=torch.long, device=self.device)
        for batch_index in range(start_batch, len(self)):
            # Drawn on the device itself: a host-side draw and copy would cost more than the step on a GPU.
            generator = seeded_generator(self.seed, epoch, batch_index, self.rank, device=self.device)
            crops = [torch.randn(self.batch_size, 3, size, size, generator=generator, device=self.device).to(self.dtype)
                     for size in self.sizes]
            yield crops, labels
