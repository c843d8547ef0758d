"""Image folder or file list -> FFCV .beton (`image` + int `label`), with a report of what was skipped.

Layout as torchvision's ImageFolder: class sub-folders (sorted names) give labels
0..C-1, recursively; a folder of loose images gives label -1; with labels="none" every
image below the folder, in sub-folders or not, is kept with label -1 (a photo library,
where folders are albums, not classes). Hidden files and
folders are ignored. A file list is a text file of `PATH` or `PATH LABEL` lines
(paths relative to the list's folder; no label is -1; a label is a class index,
0 to 2**31 - 1, checked before anything is written). Images are stored as JPEG
(what the GPU path decodes with nvJPEG) or raw pixels (no decode cost, larger).
Each file is read twice: a first pass (threads; PIL decodes without the GIL)
finds what can't be used and why, so that FFCV's writer, which must know the
sample count up front, only ever sees images that load. FFCV's writer waits
forever for a worker process that died; ours (`_WatchedWriter`) stops with an error.
"""
import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import queue
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from fastdino._requires import require_ffcv

require_ffcv("writing a .beton")

from ffcv.fields import IntField, RGBImageField  # noqa: E402
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from fastdino.data.decode import IMAGE_FIELD, LABEL_FIELD, DataError
from fastdino.data.images import load_rgb

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESOLUTION = 512
DEFAULT_JPEG_QUALITY = 90
MAX_LABEL = 2**31 - 1  # int32 class indices: what every consumer (k-NN, linear probe, torch) handles
_INTEGER = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit takes "²", which int() refuses


def find_images(src, labels: str = "folders"):
    """(files as [(path, label)], class names, skipped [{path, reason}]) of an image folder;
    labels="none": every visible file below it, label -1."""
    def visible_files(folder, pattern):
        return sorted(p for p in folder.glob(pattern)
                      if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    if labels == "none":
        return [(p, -1) for p in visible_files(src, "**/*")], [], []
    entries = visible_files(src, "*")
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        return [(p, -1) for p in entries], [], []
    files = [(p, label) for label, class_dir in enumerate(class_dirs) for p in visible_files(class_dir, "**/*")]
    loose = [{"path": str(p), "reason": "outside the class folders (keep it with --labels none)"} for p in entries]
    return files, [d.name for d in class_dirs], loose


def read_file_list(list_path):
    """(files as [(path, label)], skipped [{path, reason}]) of a file list; see the module docstring.
    Raises DataError, naming the line, for a label outside 0..2**31 - 1 that is not -1."""
    files, skipped = [], []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, -1
        head, _, tail = line.rpartition(" ")
        if head and _INTEGER.fullmatch(tail):
            # int() of thousands of digits raises; anything over 20 digits is out of range anyway
            name, label = head.strip(), int(tail) if len(tail) <= 20 else None
            if label is None or not (label == -1 or 0 <= label <= MAX_LABEL):
                shown = tail if len(tail) <= 24 else f"{tail[:12]}...({len(tail)} digits)"
                raise DataError(f"{list_path} line {number}: label {shown} is out of range: a label is a class "
                                f"index from 0 to {MAX_LABEL}, or -1 for none")
        path = list_path.parent / name
        if path.is_file():
            files.append((path, label))
        else:
            skipped.append({"path": str(path), "reason": f"no such file (line {number} of {list_path})"})
    return files, skipped


def unusable_reason(path, max_resolution):
    """Why the image file can't be converted, or None when it can."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        load_rgb(path, max_resolution)
    except UnidentifiedImageError:
        return "not an image (format not recognised)"
    except Image.DecompressionBombError as error:
        return f"decompression bomb: {error}"
    except Exception as error:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError...)
        return f"unreadable (corrupt or truncated?): {type(error).__name__}: {error}"
    return None


class _CheckedImages:
    """What FFCV's writer workers index: (image, label) per checked file.

    A file that stopped loading since the check (changed on disk) becomes a 1-pixel
    placeholder plus a flag in shared memory, since a worker that raised would hang
    the writer; the conversion then fails as a whole.
    """

    def __init__(self, files, max_resolution):
        self.files, self.max_resolution = files, max_resolution
        self.failed = multiprocessing.RawArray("b", len(files))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        try:
            return load_rgb(path, self.max_resolution), label
        except Exception:
            self.failed[index] = 1
            return np.zeros((1, 1, 3), np.uint8), label


class _WatchedWriter(DatasetWriter):
    """FFCV's DatasetWriter, except that a worker process that dies (an exception, the OOM killer)
    stops the conversion with a one-line DataError: FFCV's waits until every sample is counted,
    which a dead worker's never are, and then for the allocations it never sends. `out_path`
    names the file being made in messages (this one writes a temporary file beside it)."""

    def __init__(self, fname, fields, *, out_path, **options):
        super().__init__(fname, fields, **options)
        self.out_path = out_path

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work, allocations = multiprocessing.Queue(), multiprocessing.Queue()
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)  # one stop token per worker
        done = multiprocessing.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done, allocations,
                *extra_worker_args)
        processes = [multiprocessing.Process(target=work_fn, args=args) for _ in range(self.num_workers)]
        for process in processes:
            process.start()
        failed = True
        try:
            with tqdm(total=num_samples) as progress:
                while done.value < num_samples:
                    self._raise_if_a_worker_died(processes)
                    progress.update(done.value - progress.n)
                    time.sleep(0.1)
                progress.update(done.value - progress.n)
            table = []
            for _ in processes:
                while True:
                    try:
                        table.extend(allocations.get(timeout=0.1))
                        break
                    except queue.Empty:
                        self._raise_if_a_worker_died(processes)
            self.finalize(table)
            failed = False
        finally:
            for process in processes:
                if failed:  # the others would wait forever for the dead one's pages
                    process.terminate()
                process.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _raise_if_a_worker_died(self, processes):
        dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
        if dead:
            how = (f"killed by {signal.Signals(-dead[0]).name}" if dead[0] < 0 else f"exit code {dead[0]}")
            raise DataError(f"a writer process died ({how}; its error, if any, is above) while writing "
                            f"{self.out_path}: nothing was written; run the conversion again")


def _page_size(max_resolution):
    """FFCV's storage page: a power of two >= 2 MiB that holds the largest JPEG (< 2x the raw pixels)."""
    return max(MIN_PAGE_SIZE, 1 << (6 * max_resolution ** 2 - 1).bit_length())


def _write_json_atomically(path, content):
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(tmp, path)


def convert_folder(src, out_path, *, max_resolution=DEFAULT_MAX_RESOLUTION, jpeg_quality=DEFAULT_JPEG_QUALITY,
                   storage="jpg", num_workers=None, progress=True, labels="folders"):
    """Converts an image folder or file list into the .beton `out_path`, and writes `out_path + '.report.json'`.

    Images become RGB with their EXIF orientation applied, the longer side at most
    `max_resolution`, stored as JPEG of `jpeg_quality` (storage="jpg") or raw pixels
    (storage="raw"). Unusable files (corrupt, truncated, empty, not images,
    decompression bombs, missing list entries) are skipped with a reason. The .beton
    appears only once complete (written to a temporary file beside it, then renamed).
    `labels`: "folders" (class sub-folders give labels) or "none" (every image, label -1).
    Returns the report: {"written": int, "skipped": [{"path", "reason"}], "classes": [names]}.
    Raises DataError when src does not exist or no image in it can be converted.
    """
    src, out_path = Path(src), Path(out_path)
    if not src.exists():
        raise DataError(f"no such image folder or file list: {src}")
    if not 1 <= jpeg_quality <= 100 or max_resolution < 1:
        raise DataError(f"need 1 <= jpeg_quality <= 100 and max_resolution >= 1, got {jpeg_quality}, {max_resolution}")
    if storage not in ("jpg", "raw"):
        raise DataError(f"storage must be 'jpg' or 'raw', got {storage!r}")
    if labels not in ("folders", "none"):
        raise DataError(f"labels must be 'folders' or 'none', got {labels!r}")
    num_workers = num_workers or os.cpu_count() or 1

    if src.is_dir():
        files, classes, skipped = find_images(src, labels)
    else:
        (files, skipped), classes = read_file_list(src), []
    with ThreadPoolExecutor(num_workers) as pool:
        reasons = list(tqdm(pool.map(partial(unusable_reason, max_resolution=max_resolution), [p for p, _ in files]),
                            total=len(files), desc="checking images", unit="img", disable=not progress))
    skipped += [{"path": str(path), "reason": reason} for (path, _), reason in zip(files, reasons) if reason]
    usable = [item for item, reason in zip(files, reasons) if not reason]
    for entry in skipped:
        logger.warning("skipping %s: %s", entry["path"], entry["reason"])
    if not usable:
        example = f" (e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise DataError(f"no image in {src} could be converted: {len(skipped)} files skipped{example}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")
    try:
        images = _CheckedImages(usable, max_resolution)
        fields = {IMAGE_FIELD: RGBImageField(write_mode=storage, jpeg_quality=jpeg_quality), LABEL_FIELD: IntField()}
        writer = _WatchedWriter(str(tmp), fields, out_path=out_path, page_size=_page_size(max_resolution),
                                num_workers=min(num_workers, len(usable)))
        # FFCV's writer always draws its own progress bar (on stderr)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(sys.stderr if progress else devnull):
            writer.from_indexed_dataset(images, chunksize=max(1, min(100, len(usable) // (4 * num_workers))))
        changed = [str(usable[i][0]) for i, failed in enumerate(images.failed) if failed]
        if changed:
            raise DataError(f"{len(changed)} files stopped loading during the conversion (e.g. {changed[0]}); "
                            "run it again")
        report = {"written": len(usable), "skipped": skipped, "classes": classes}
        _write_json_atomically(out_path.with_name(out_path.name + ".report.json"), report)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s: %d images, %d classes, %d skipped", out_path, len(usable), len(classes), len(skipped))
    return report

