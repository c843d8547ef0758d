"""Decode stage: the JPEGs of a .beton -> padded uint8 canvases (or the JPEG bytes), in an order we choose.

FFCV's stock image decoders need one image size, or crop each image once with
their own unseeded RNG. `CanvasDecoder` instead decodes every image whole, with
FFCV's libjpeg-turbo binding, into the top-left corner of a `[max_h, max_w, 3]`
canvas (max over the whole file). Each image's true size is in the .beton's
metadata, as are the labels, so `BetonImages` looks both up by sample index: it
runs FFCV's pipeline over the sample order it is given and knows which samples
each batch holds. For the GPU path `StoredBytes` instead copies each sample's
stored bytes (JPEG, or raw pixels) into a row, and nvJPEG decodes them on the GPU
(gpu_decode.py). Augmentation is a separate stage (multicrop.py, cpu_crops.py).
"""
import ctypes
import ctypes.util
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fastdino._requires import require_ffcv

require_ffcv("reading a .beton")

from ffcv.fields import IntField, RGBImageField  # noqa: E402  (after the check that names what is missing)
from ffcv.fields.rgb_image import IMAGE_MODES  # noqa: E402
from ffcv.libffcv import imdecode
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.reader import Reader
from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType
from PIL import Image

from fastdino.data import ffcv_threads  # noqa: F401  (imported for its effect: FFCV leaves torch's threads alone)

logger = logging.getLogger(__name__)

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
MAKE_ONE = "make one with `fastdino data convert IMAGE_FOLDER OUT.beton`"


class DataError(ValueError):
    """A data problem, reported to the user as one line."""


def check_beton(path, *, source: str | None = None, need_labels: bool = False) -> None:
    """Raises DataError, one line saying what is wrong and what to do, unless `path` is a .beton
    that `BetonImages` can read (and, with need_labels, every image has a label >= 0).

    Reads the file's header and sample records only, so it is cheap enough to call before
    anything else. `source` names the setting the path came from (e.g. "data.path",
    "--train") in the message.
    """
    reader = _open_beton(path, source)
    if need_labels:
        labels = reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]
        unlabelled = int((labels < 0).sum())
        if unlabelled:
            raise DataError(f"{_name(path, source)} has {unlabelled} of {len(labels)} images without a label (-1: "
                            f"`data convert` of a folder without class sub-folders), and labels are needed here: "
                            f"convert a folder with one sub-folder per class")


def _name(path, source):
    return f"{source}={path}" if source else str(path)


def _open_beton(path, source=None) -> Reader:
    """FFCV's Reader of a .beton with the `image` and `label` fields, or a one-line DataError."""
    name = _name(path, source)
    if not str(path).strip():  # an unset path; Path("") would be the current folder
        raise DataError(f"{source or 'the .beton path'} is empty: give a .beton file ({MAKE_ONE}; "
                        f"data.path=synthetic trains on random crops, `fastdino demo` on digits)")
    path = Path(path)
    if path.is_dir():
        out = path.with_name(path.name + ".beton") if path.name else "OUT.beton"
        raise DataError(f"{name} is a folder, not a .beton file: convert it first with "
                        f"`fastdino data convert {path} {out}` and give that file")
    if not path.is_file():
        raise DataError(f"{name}: no such .beton file ({MAKE_ONE})")
    if path.stat().st_size == 0:
        raise DataError(f"{name} is an empty file, not a .beton file: {MAKE_ONE}")
    header = np.fromfile(path, dtype=HeaderType, count=1)
    if len(header) == 0 or header[0]["version"] != CURRENT_VERSION:
        image_format = _image_format(path)
        if image_format:
            raise DataError(f"{name} is a {image_format} image, not a .beton file: put the images in a folder "
                            f"and convert it with `fastdino data convert FOLDER OUT.beton`")
        raise DataError(f"{name} is not an FFCV .beton file (no FFCV format-{CURRENT_VERSION} header): {MAKE_ONE}")
    try:
        reader = Reader(str(path))
    except Exception:  # numpy errors from reading field descriptors or records past the end of the file
        raise DataError(f"{name} is damaged or truncated (its FFCV header is intact, what follows is not): "
                        f"convert it again") from None
    fields = reader.handlers
    if not isinstance(fields.get(IMAGE_FIELD), RGBImageField) or not isinstance(fields.get(LABEL_FIELD), IntField):
        raise DataError(f"{name} needs an RGBImageField '{IMAGE_FIELD}' and an IntField '{LABEL_FIELD}'; "
                        f"it has {', '.join(f'{n} ({type(f).__name__})' for n, f in fields.items())}")
    if reader.num_samples == 0:
        raise DataError(f"{name} holds no images: convert a folder that has images in it")
    # A file cut short loses its sample records or its allocation table (written last).
    if len(reader.metadata) < reader.num_samples or len(reader.alloc_table) < reader.num_samples:
        raise DataError(f"{name} is truncated (its header counts {reader.num_samples} images, the file holds "
                        f"records of {min(len(reader.metadata), len(reader.alloc_table))}): convert it again")
    damage = _layout_damage(reader, path.stat().st_size)
    if damage:
        raise DataError(f"{name} is damaged: {damage}; convert it again")
    return reader


def _layout_damage(reader: Reader, file_size: int) -> str | None:
    """What is inconsistent in a .beton's layout, or None. FFCV reads whatever the allocation table
    (the end of the file) and the sample records say, unchecked: a damaged table would feed the
    decoder bytes of other images or of no image at all. Checks that the table ends the file,
    that every allocation lies in the data region between the sample records and the table, and
    that every image's data pointer is an allocation; vectorised, so cheap even for millions of images."""
    table, table_start = reader.alloc_table, int(reader.header["alloc_table_ptr"])
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    tail = file_size - table_start
    if table_start < data_start or tail % ALLOC_TABLE_TYPE.itemsize:
        return (f"its allocation table (at byte {table_start}, {tail} bytes up to the end of the file) does not fit "
                f"the file")
    ptrs, sizes = table["ptr"], table["size"]
    # unsigned: a pointer past the table makes table_start - ptrs wrap, but it is caught by the first test
    outside = (ptrs < data_start) | (ptrs > table_start) | (sizes > np.uint64(table_start) - ptrs)
    outside |= table["sample_id"] >= reader.num_samples
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        return (f"{int(outside.sum())} of its {len(table)} allocation table entries point outside its data "
                f"(the first, entry {bad}: {int(ptrs[bad])} + {int(sizes[bad])} bytes, data between {data_start} "
                f"and {table_start})")
    image = reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]
    unallocated = ~np.isin(image["data_ptr"], ptrs)
    if unallocated.any():
        return f"{int(unallocated.sum())} of its {len(image)} images point at data its allocation table does not hold"
    if ((image["height"] == 0) | (image["width"] == 0)).any():
        return "some of its images have a zero height or width"
    return None


def file_identity(path) -> tuple:
    """(device, inode, size, modification time) of `path`: what changes when the file is replaced
    (a rename over it, as `data convert` does) or rewritten in place."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _image_format(path) -> str | None:
    """PIL's name for the format of an image file (JPEG, PNG, ...), or None for anything else."""
    try:
        with Image.open(path) as image:
            return image.format
    except Exception:  # not an image: PIL raises UnidentifiedImageError and others
        return None


# One numba dispatcher per process, called with a 3-D destination: FFCV flips the
# shared numba type of 1-D uint8 arrays to read-only whenever it builds a loader,
# which changes the hash of dispatcher signatures that contain that type (KeyErrors
# in numba, or a silently dead decode thread).
decode_jpeg = Compiler.compile(imdecode)
# libc's memmove (overlap-safe), called from the numba decode loop through ctypes as FFCV calls libturbojpeg
_memmove = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").memmove
_memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memmove.restype = ctypes.c_void_p


class CanvasDecoder(Operation):
    """FFCV decoder: each image of a batch into the top-left of its own [max_h, max_w, 3] uint8 canvas.

    Pixels outside an image's own (height, width) are left as they were (stale data).
    """

    def declare_state_and_memory(self, previous_state):
        shape = (int(self.metadata["height"].max()), int(self.metadata["width"].max()), 3)
        dtype = np.dtype("u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def generate_code(self):
        read_sample = self.memory_read
        sample_range = Compiler.get_iterator()
        jpeg_mode = IMAGE_MODES["jpg"]
        memmove = _memmove

        def decode(batch_indices, canvases, metadata, storage_state):
            canvas_row = np.int64(canvases.shape[2]) * 3
            for slot in sample_range(len(batch_indices)):
                sample = metadata[batch_indices[slot]]
                data = read_sample(sample["data_ptr"], storage_state)
                height, width = np.int64(sample["height"]), np.int64(sample["width"])
                image_row = width * 3
                # libjpeg-turbo writes packed rows (it takes no row stride), so decode
                # packed at the start of the canvas, then move rows to their canvas
                # offsets, last row first: a row's destination never lies below its
                # source, so nothing is overwritten before it has been moved. One memmove
                # per row (overlap-safe): a byte loop here cost 0.6 ms per 375 x 500 image.
                if sample["mode"] == jpeg_mode:
                    decode_jpeg(data, canvases[slot], height, width, height, width, 0, 0, 1, 1, False, False)
                else:  # stored raw
                    canvases[slot].reshape(-1)[: height * image_row] = data[: height * image_row]
                if image_row < canvas_row:
                    start = canvases[slot].ctypes.data
                    for y in range(height - 1, 0, -1):
                        memmove(start + y * canvas_row, start + y * image_row, image_row)
            return canvases[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class StoredBytes(Operation):
    """FFCV decoder: each sample's stored image bytes (a JPEG file, or raw RGB rows) into a row of
    [max_bytes] uint8; the lengths and storage modes are in `BetonImages`."""

    def declare_state_and_memory(self, previous_state):
        shape, dtype = (int(self.max_bytes),), np.dtype("u1")
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), AllocationQuery(shape, dtype)

    def __init__(self, max_bytes):
        super().__init__()
        self.max_bytes = max_bytes

    def generate_code(self):
        read_sample = self.memory_read
        sample_range = Compiler.get_iterator()

        def copy(batch_indices, rows, metadata, storage_state):
            for slot in sample_range(len(batch_indices)):
                data = read_sample(metadata[batch_indices[slot]]["data_ptr"], storage_state)
                rows[slot, : len(data)] = data
            return rows[: len(batch_indices)]

        copy.is_parallel = True
        return copy


class BetonImages:
    """The images and labels of a .beton, decoded in batches of any sample order.

    Expects FFCV fields `image` (RGBImageField) and `label` (IntField), as
    `convert_folder` writes them; other fields are ignored (a file that is not such a .beton
    is a one-line DataError, see `check_beton`). stored_bytes=True yields
    each image's stored bytes instead of pixels (for the GPU decoder). os_cache: read
    through the OS page cache (memory-mapped file; best when the data set fits in RAM)
    rather than FFCV's own page reads; keep to one setting per process (FFCV's two memory
    managers retype a numba array type they share, and a process that built loaders
    with both can hang in numba's compiler). batches_ahead: batches FFCV prepares in
    advance, which bounds the memory in flight.
    """

    def __init__(self, path, batch_size, num_workers=2, *, stored_bytes=False, os_cache=True, batches_ahead=3):
        self.identity = file_identity(path) if Path(path).is_file() else None  # before reading: see _check_unchanged
        reader = _open_beton(path)
        path, fields = Path(path), reader.handlers
        self.path = path
        metadata = reader.metadata
        image_meta = metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]
        self.heights = image_meta["height"].astype(np.int64)
        self.widths = image_meta["width"].astype(np.int64)
        self.is_jpeg = image_meta["mode"] == IMAGE_MODES["jpg"]
        self.labels = metadata[f"f{reader.field_names.index(LABEL_FIELD)}"].astype(np.int64)
        self.num_images = int(reader.num_samples)
        # each image's stored bytes: its allocation, found by address in the allocation table
        table = reader.alloc_table[np.argsort(reader.alloc_table["ptr"])]
        image_alloc = table[np.searchsorted(table["ptr"], image_meta["data_ptr"])]
        self.stored_lengths = image_alloc["size"].astype(np.int64)
        self.pages = (image_alloc["ptr"] // reader.page_size).astype(np.int64)  # for the quasi-random order

        pipelines = {name: None for name in fields}  # labels and sizes come from the metadata, no decoding needed
        decoder = StoredBytes(self.stored_lengths.max(initial=1)) if stored_bytes else CanvasDecoder()
        pipelines[IMAGE_FIELD] = PipelineSpec(IMAGE_FIELD, decoder=decoder)
        self.batch_size, self.stored_bytes = batch_size, stored_bytes
        # seed only so FFCV leaves numpy's global RNG alone; the order is ours
        self.ffcv_loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers, seed=0,
                                  pipelines=pipelines, os_cache=os_cache, batches_ahead=batches_ahead)
        logger.info("%s: %d images, canvas %dx%d", path, self.num_images, self.heights.max(initial=0),
                    self.widths.max(initial=0))

    def batches(self, order):
        """Yields (canvases uint8 [b, max_h, max_w, 3], sizes long [b, 2] as (h, w), labels long [b])
        for consecutive batch_size chunks of the sample indices `order` (the last may be short).
        With stored_bytes, canvases is instead uint8 [b, max_bytes]: row i holds image i's
        stored bytes and sizes gets two more columns: the byte count, and 1 for a JPEG (0: raw RGB rows).

        The canvases are FFCV's buffers: use them before asking for the next batch. Raises
        DataError when the file changed since it was opened (see _check_unchanged).
        """
        order = np.asarray(order, dtype=np.uint64)
        if len(order) == 0:
            return
        self._check_unchanged()
        decoded = EpochIterator(self.ffcv_loader, order)  # FFCV's prefetching thread, fed our order
        try:
            for start in range(0, len(order), self.batch_size):
                _wait_for_batch(decoded)
                (canvases,) = next(decoded)
                self._check_unchanged()
                indices = order[start: start + self.batch_size].astype(np.int64)
                columns = [self.heights[indices], self.widths[indices]]
                if self.stored_bytes:
                    columns += [self.stored_lengths[indices], self.is_jpeg[indices].astype(np.int64)]
                sizes = np.stack(columns, axis=1)
                yield torch.from_numpy(canvases), torch.from_numpy(sizes), torch.from_numpy(self.labels[indices])
        finally:
            decoded.close()

    def _check_unchanged(self):
        """Raises DataError when the .beton is no longer the file that was opened. FFCV's page
        reader (os_cache=False) opens the file by name at every epoch, so a file replaced under a
        run would be read through the old file's index (sizes, labels, data pointers); memory-mapped
        reading keeps the old file, but a resumed run would read the new one. One stat per batch,
        after the batch was read: a batch read from a replaced file is never used."""
        try:
            now = file_identity(self.path)
        except OSError:
            now = None
        if now != self.identity:
            what = "deleted" if now is None else "replaced" if now[:2] != self.identity[:2] else "rewritten in place"
            raise DataError(f"{self.path} was {what} while this run was reading it: its images no longer match the "
                            f"index read when it was opened; start the run again (--resume auto continues from the "
                            f"last checkpoint)")


def _wait_for_batch(decoded):
    """Waits for FFCV's next batch; FFCV itself would wait forever if its thread had died."""
    while decoded.output_queue.empty():
        if not decoded.is_alive():
            raise RuntimeError("FFCV's decoding thread died (its traceback is above)")
        time.sleep(0.001)
