"""Training and evaluation loaders over a .beton: sample order and seeding.

An epoch's order is one seeded permutation of the whole file, cut into a strided
shard per rank (as torch's DistributedSampler), so ranks see disjoint images and
every epoch reshuffles across ranks. Batch b of epoch e on rank r is augmented
with a torch.Generator seeded from (seed, e, b, r) alone, so a batch is the same
whether its epoch ran from the start or resumed at b.
"""
import math

import numpy as np
import torch

from fastdino.data.decode import BetonImages
from fastdino.data.multicrop import augment_params, center_crops, multicrop


def seeded_generator(*keys):
    """A CPU torch.Generator whose stream is a function of the non-negative ints `keys` alone."""
    state = np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def epoch_order(num_images, batch_size, *, seed, epoch, rank, world_size, drop_last=True):
    """The sample indices rank `rank` reads in epoch `epoch`, in order.

    drop_last: every rank gets the same number of full batches, the rest of the
    permutation is left out. Otherwise the permutation wraps around to a multiple of
    world_size (as DistributedSampler) and each rank's last batch may be short.
    """
    order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_images)
    if drop_last:
        order = order[: len(order) // (world_size * batch_size) * world_size * batch_size]
    else:
        order = np.resize(order, math.ceil(len(order) / world_size) * world_size)
    return order[rank::world_size]


class MultiCropLoader:
    """Batches of DINO multi-crop views: iterate for `(crops, labels)` of the current epoch.

    crops: [global1, global2, local1, ..., localN], each [B, 3, size, size] on `device`;
    labels: long [B] (-1 for unlabelled images).
    """

    def __init__(self, beton_path, batch_size, *, n_local_crops=8, global_size=224, local_size=96, device="cpu",
                 seed=0, rank=0, world_size=1, augment=None, num_workers=2, drop_last=True, dtype=torch.float32):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.images = BetonImages(beton_path, batch_size, num_workers)
        self.batch_size, self.drop_last = batch_size, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.crop_args = dict(n_local_crops=n_local_crops, global_size=global_size, local_size=local_size,
                              params=augment_params(augment), device=torch.device(device), dtype=dtype)
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(f"{beton_path}: {self.num_images} images make no full batch of {batch_size} "
                             f"on each of {world_size} ranks")

    @property
    def num_images(self):
        """Images in the .beton (all ranks together)."""
        return self.images.num_images

    def __len__(self):
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.num_images // (self.world_size * self.batch_size)
        return math.ceil(math.ceil(self.num_images / self.world_size) / self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return self.iter_epoch(self.epoch)

    def iter_epoch(self, epoch, start_batch=0):
        """Batches start_batch, start_batch + 1, ... of epoch `epoch`, each the same as in a full run."""
        order = self._order(epoch)[start_batch * self.batch_size:]
        device = self.crop_args["device"]
        batches = self.images.batches(order)
        for batch_index, (canvases, sizes, labels) in enumerate(batches, start=start_batch):
            generator = seeded_generator(self.seed, epoch, batch_index, self.rank)
            crops = multicrop(canvases, sizes, generator, **self.crop_args)
            yield crops, labels.to(device)

    def _order(self, epoch):
        return epoch_order(self.num_images, self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size, drop_last=self.drop_last)


class EvalLoader:
    """Batches of centre-cropped images in file order: iterate for `(images [B, 3, size, size], labels [B])`.

    Rank r reads the r-th of world_size contiguous parts of the file; the last batch may be short.
    """

    def __init__(self, beton_path, batch_size, *, size=224, device="cpu", rank=0, world_size=1, num_workers=2,
                 dtype=torch.float32):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.images = BetonImages(beton_path, batch_size, num_workers)
        self.batch_size, self.size = batch_size, size
        self.device, self.dtype = torch.device(device), dtype
        self.order = np.array_split(np.arange(self.images.num_images), world_size)[rank]

    @property
    def num_images(self):
        """Images in the .beton (all ranks together)."""
        return self.images.num_images

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size)

    def __iter__(self):
        for canvases, sizes, labels in self.images.batches(self.order):
            yield center_crops(canvases, sizes, self.size, self.device, self.dtype), labels.to(self.device)


def multicrop_loader(beton_path, batch_size, **options):
    """DINO training loader over a .beton; `options` are MultiCropLoader's keyword arguments
    (n_local_crops=8, global_size=224, local_size=96, device, seed, rank, world_size, augment,
    num_workers, drop_last, dtype)."""
    return MultiCropLoader(beton_path, batch_size, **options)


def eval_loader(beton_path, batch_size, **options):
    """Evaluation (k-NN) loader over a .beton: file order, centre crops, nothing random; `options` are
    EvalLoader's keyword arguments (size=224, device, rank, world_size, num_workers, dtype)."""
    return EvalLoader(beton_path, batch_size, **options)
