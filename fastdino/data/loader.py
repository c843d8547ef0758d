"""Training and evaluation loaders over a .beton: sample order, seeding, which decode and crop code runs,
and the evaluation view (centre crop).

An epoch's order is one seeded permutation of the whole file, cut into a strided
shard per rank (as torch's DistributedSampler), so ranks see disjoint images and
every epoch reshuffles across ranks. The quasi-random order shuffles storage
pages and images within small groups of pages instead, and gives each rank a
contiguous part, so a rank reads few pages (for data sets larger than RAM).
Batch b of epoch e on rank r is augmented with a torch.Generator seeded from
(seed, e, b, r) alone, so a batch is the same whether its epoch ran from the
start or resumed at b, and whichever device or code path computes its pixels. The crop
settings become one ViewRecipe (recipe.py) when a loader is made, shared by its batches.

On a GPU the batches are made ahead (`prefetched`): a thread of their own decodes and crops
the next batches on a CUDA stream of its own while the training step runs, and hands each over
with an event; the batches are the serial path's, made earlier.
"""
import contextlib
import logging
import math
import queue
import threading

import numpy as np
import torch

from fastdino.data.cpu_crops import CpuMultiCrop
from fastdino.data.decode import BetonImages
from fastdino.data.gpu_decode import NvJpegDecoder, nvimgcodec_status
from fastdino.data.multicrop import TorchMultiCrop
from fastdino.data.pixels import IMAGENET_MEAN, IMAGENET_STD, normalize, to_device
from fastdino.data.recipe import ViewRecipe, seeded_generator
from fastdino.data.resample import resize

logger = logging.getLogger(__name__)
ORDERS = ("random", "quasi_random")
PAGES_PER_SHUFFLE_GROUP = 8  # quasi-random: images mix within groups of this many storage pages


def epoch_order(num_images, batch_size, *, seed, epoch, rank, world_size, drop_last=True, pages=None):
    """The sample indices rank `rank` reads in epoch `epoch`, in order.

    drop_last: every rank gets the same number of full batches, the rest of the
    permutation is left out. Otherwise the permutation wraps around to a multiple of
    world_size (as DistributedSampler) and each rank's last batch may be short.
    pages: each image's storage page; given, the order is quasi-random (see the module
    docstring) and rank r reads the r-th contiguous part of it.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    if pages is None:
        order = rng.permutation(num_images)
    else:
        page_ids, page_of_image = np.unique(pages, return_inverse=True)
        page_rank = np.empty(len(page_ids), np.int64)
        page_rank[rng.permutation(len(page_ids))] = np.arange(len(page_ids))
        group = page_rank[page_of_image] // PAGES_PER_SHUFFLE_GROUP
        order = np.lexsort((rng.random(num_images), group))  # by page group, random within a group
    if drop_last:
        order = order[: len(order) // (world_size * batch_size) * world_size * batch_size]
    else:
        order = np.resize(order, math.ceil(len(order) / world_size) * world_size)
    if pages is None:
        return order[rank::world_size]
    return np.array_split(order, world_size)[rank]


def pick_paths(device, decode, crops):
    """(device, decode, crops) with 'auto' resolved, logging why; a path that can't run here is a ValueError.

    decode: 'nvjpeg' (GPU) or 'cpu' (FFCV's libjpeg-turbo); crops: 'torch' (batched
    tensor ops, on the images' device) or 'opencv' (uint8, CPU threads).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info("data device auto -> %s (%s)", device,
                    "CUDA is available" if device == "cuda" else "no CUDA device")
    device = torch.device(device)
    if decode == "auto":
        # decided by decoding a test JPEG on the device (gpu_decode.nvimgcodec_status)
        usable, reason = nvimgcodec_status(device)
        decode = "nvjpeg" if usable else "cpu"
        logger.info("JPEG decode auto -> %s (%s)", decode, reason)
    elif decode == "nvjpeg":
        usable, reason = nvimgcodec_status(device)
        if not usable:
            raise ValueError(f"data.decode=nvjpeg can't run: {reason}")
    elif decode != "cpu":
        raise ValueError(f"decode must be auto, nvjpeg or cpu, got {decode!r}")
    if crops == "auto":
        crops = "opencv" if device.type == "cpu" else "torch"
        logger.info("multi-crop auto -> %s (%s)", crops, "uint8 OpenCV threads are the fastest CPU path"
                    if crops == "opencv" else f"batched tensor ops on {device}")
    elif crops == "opencv" and device.type != "cpu":
        raise ValueError(f"data.crops=opencv runs on the CPU only; the device is {device}")
    elif crops not in ("opencv", "torch"):
        raise ValueError(f"crops must be auto, opencv or torch, got {crops!r}")
    return device, decode, crops


class MultiCropLoader:
    """Batches of DINO multi-crop views: iterate for `(crops, labels)` of the current epoch.

    crops: [global1, global2, local1, ..., localN], each [B, 3, size, size] on `device`;
    labels: long [B] (-1 for unlabelled images). n_local_crops, global_size, local_size and
    augment (a fastdino.config.AugmentConfig, overrides of some of its keys, or None for the
    defaults) make the loader's `recipe` (recipe.ViewRecipe), fixed from then on.

    device: where the crops go ('cpu', 'cuda[:i]' or 'auto'); decode: 'auto' (nvJPEG
    on a GPU where it decodes a probe JPEG on the device, else the CPU), 'nvjpeg' or 'cpu'; crops:
    'auto' (OpenCV uint8 threads on the CPU, batched tensor ops on a GPU), 'opencv' or
    'torch'. order: 'random' or 'quasi_random' (page-grouped, for data larger than RAM);
    os_cache: read through the OS page cache rather than FFCV's page reader;
    batches_ahead: batches prepared in advance, by FFCV and by the overlap (bounds the memory in
    flight); overlap: make the batches in a thread and CUDA stream of their own while the consumer
    works (`prefetched`; None: on CUDA devices only). The batches are the same either way.
    """

    def __init__(self, beton_path, batch_size, *, n_local_crops=8, global_size=224, local_size=96, device="cpu",
                 seed=0, rank=0, world_size=1, augment=None, num_workers=2, drop_last=True, dtype=torch.float32,
                 decode="auto", crops="auto", order="random", os_cache=True, batches_ahead=3, overlap=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        device, decode, crops = pick_paths(device, decode, crops)
        self.images = BetonImages(beton_path, batch_size, num_workers, stored_bytes=decode == "nvjpeg",
                                  os_cache=os_cache, batches_ahead=batches_ahead)
        self.batch_size, self.drop_last, self.order = batch_size, drop_last, order
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.decode, self.crops = device, decode, crops
        self.batches_ahead = batches_ahead
        self.overlap = device.type == "cuda" if overlap is None else overlap
        self.recipe = ViewRecipe(n_local_crops, global_size, local_size, augment)
        self.gpu_decoder = NvJpegDecoder(device, num_workers) if decode == "nvjpeg" else None
        if crops == "opencv":
            self.make_views = CpuMultiCrop(self.recipe, threads=num_workers, dtype=dtype)
        else:
            self.make_views = TorchMultiCrop(self.recipe, device=device, dtype=dtype)
        self.epoch = 0
        if len(self) == 0:
            fits = max(1, self.num_images // world_size)
            raise ValueError(f"{beton_path}: {self.num_images} images make no full batch of {batch_size} "
                             f"on each of {world_size} rank(s): lower data.batch_size (at most {fits})")

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
        batches = self._batches(epoch, start_batch)
        return prefetched(batches, self.batches_ahead, self.device) if self.overlap else batches

    def _batches(self, epoch, start_batch):
        order = self._order(epoch)[start_batch * self.batch_size:]
        for batch_index, (canvases, sizes, labels) in enumerate(self.images.batches(order), start=start_batch):
            generator = seeded_generator(self.seed, epoch, batch_index, self.rank)
            if self.gpu_decoder is not None:
                canvases, sizes = self.gpu_decoder(canvases, sizes), sizes[:, :2]
            yield self.make_views(canvases, sizes, generator), to_device(labels, self.device)

    def _order(self, epoch):
        return epoch_order(self.num_images, self.batch_size, seed=self.seed, epoch=epoch, rank=self.rank,
                           world_size=self.world_size, drop_last=self.drop_last,
                           pages=self.images.pages if self.order == "quasi_random" else None)


_END = object()  # the producer's last item


class _Failure:
    def __init__(self, error):
        self.error = error


class _Producer:
    """The thread behind `prefetched`: runs `batches` and queues at most `ahead` of them."""

    def __init__(self, batches, ahead, device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.queue = queue.Queue(maxsize=max(1, ahead))
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(batches,), name="fastdino-batches", daemon=True)
        self.thread.start()

    def _run(self, batches):
        try:
            with self._on_stream():
                for crops, labels in batches:
                    done = None
                    if self.stream is not None:
                        done = torch.cuda.Event()
                        done.record(self.stream)
                    if not self._put((crops, labels, done)):
                        return
            self._put(_END)
        except BaseException as error:  # noqa: BLE001  (handed to the consumer, which raises it)
            self._put(_Failure(error))
        finally:
            batches.close()

    def _on_stream(self):
        if self.stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def _put(self, item):
        """Queues `item`; False once the consumer has stopped."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self):
        """The next batch, on the consumer's stream; None after the last."""
        item = self.queue.get()
        if item is _END:
            return None
        if isinstance(item, _Failure):
            raise item.error
        crops, labels, done = item
        if done is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(done)  # the GPU waits, the host does not
            for tensor in (*crops, labels):
                tensor.record_stream(consumer)  # its memory is not reused until the consumer's work is done
        return crops, labels

    def stop(self):
        self.stopping.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join()


def prefetched(batches, ahead, device):
    """The `(crops, labels)` of the generator `batches`, made up to `ahead` batches in advance.

    A thread runs `batches`; on a CUDA `device` it runs them on a CUDA stream of its own, so that
    their decode and crops overlap with the consumer's work, and records an event after each batch:
    the consumer's current stream waits on it (no host sync), and the batch's tensors are recorded
    on that stream for the caching allocator. An error in the thread is raised here; closing this
    generator (or dropping it) stops the thread. The batches and their order are those of `batches`.
    """
    producer = _Producer(batches, ahead, torch.device(device))
    try:
        while (batch := producer.get()) is not None:
            yield batch
    finally:
        producer.stop()


def center_crops(canvases, sizes, size, device="cpu", dtype=torch.float32):
    """The evaluation view: short side resized to size * 256 / 224 (bicubic, antialiased), central
    size x size crop, ImageNet normalisation, as torchvision's Resize(256) + CenterCrop(224).

    canvases: uint8 [B, max_h, max_w, 3] with image i in its top-left sizes[i] = (h, w); sizes:
    long [B, 2] on the CPU. Returns `dtype` [B, 3, size, size] on `device`.
    """
    canvases = canvases.to(device, non_blocking=True)
    out = canvases.new_empty((len(sizes), 3, size, size), dtype=torch.float32)
    short_side = int(size * 256 / 224)
    for i, (height, width) in enumerate(sizes.tolist()):
        if height <= width:
            new_h, new_w = short_side, int(short_side * width / height)
        else:
            new_h, new_w = int(short_side * height / width), short_side
        image = resize(canvases[i, :height, :width].permute(2, 0, 1)[None], (new_h, new_w))
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        out[i] = image[0, :, top: top + size, left: left + size]
    return normalize(out.clamp_(0, 255).div_(255), IMAGENET_MEAN, IMAGENET_STD, dtype)


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
    num_workers, drop_last, dtype, decode, crops, order, os_cache, batches_ahead, overlap)."""
    return MultiCropLoader(beton_path, batch_size, **options)


def eval_loader(beton_path, batch_size, **options):
    """Evaluation (k-NN) loader over a .beton: file order, centre crops, nothing random; `options` are
    EvalLoader's keyword arguments (size=224, device, rank, world_size, num_workers, dtype)."""
    return EvalLoader(beton_path, batch_size, **options)
