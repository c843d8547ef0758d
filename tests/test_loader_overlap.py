"""The overlapped loader (fastdino.data.loader.prefetched): batches made in a thread of their own (and on
a GPU, a CUDA stream of their own) are exactly the serial loader's, in order, at most `batches_ahead`
ahead; errors reach the consumer and stopping early ends the thread. On the CPU the thread and queue
run as on a GPU, without the stream and events; the tests that need those skip without CUDA."""
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import convert_folder, multicrop_loader
from fastdino.data.loader import prefetched
from fastdino.data.sample_data import sample_photos

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OPTIONS = dict(n_local_crops=2, global_size=40, local_size=24, seed=4)


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    """12 crops of scikit-image's photos, 40 to 96 px a side (canvases with padding)."""
    root = tmp_path_factory.mktemp("overlap")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    photos = list(sample_photos().values())
    for i in range(12):
        photo = photos[i % len(photos)]
        h, w = int(rng.integers(40, 97)), int(rng.integers(40, 97))
        Image.fromarray(np.ascontiguousarray(photo[:h * 2:2, :w * 2:2])).convert("RGB").save(
            root / "images" / f"{i:02d}.jpg", quality=95)
    convert_folder(root / "images", root / "photos.beton", max_resolution=96, num_workers=1, progress=False)
    return root / "photos.beton"


def same_batches(batches, other):
    return len(batches) == len(other) and all(
        torch.equal(labels, labels2) and len(crops) == len(crops2)
        and all(torch.equal(a, b) for a, b in zip(crops, crops2))
        for (crops, labels), (crops2, labels2) in zip(batches, other))


def epoch(loader, index, start_batch=0):
    """The batches of an epoch, copied (the OpenCV path reuses its output arrays once they are released)."""
    return [([c.clone() for c in crops], labels.clone()) for crops, labels in loader.iter_epoch(index, start_batch)]


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "fastdino-batches"]


@pytest.mark.parametrize("crops, batched", [("opencv", False), ("torch", False), ("torch", True)])
def test_overlapped_batches_are_the_serial_ones(beton, crops, batched):
    serial = multicrop_loader(beton, 4, crops=crops, **OPTIONS)
    overlapped = multicrop_loader(beton, 4, crops=crops, overlap=True, batches_ahead=2, **OPTIONS)
    assert not serial.overlap and overlapped.overlap  # on the CPU the overlap is off unless asked for
    for loader in (serial, overlapped):
        loader.make_views.batched_resize = batched if crops == "torch" else None
    reference = epoch(serial, 1)
    assert len(reference) == 3
    assert same_batches(reference, epoch(overlapped, 1))
    assert same_batches(reference[1:], epoch(overlapped, 1, start_batch=1))  # a resumed epoch
    assert not prefetch_threads()


def test_prefetched_keeps_the_order_and_runs_at_most_ahead():
    made = []

    def batches():
        for i in range(12):
            made.append(i)
            yield [torch.full((2,), float(i))], torch.tensor([i])

    seen = []
    for crops, labels in prefetched(batches(), 3, "cpu"):
        time.sleep(0.01)  # a slow consumer: the producer fills the queue and waits
        # queued (3), in the producer's hands (1), and the one handed over
        assert len(made) - len(seen) <= 3 + 1 + 1
        seen.append(int(labels))
        assert float(crops[0][0]) == seen[-1]
    assert seen == list(range(12)) == made


def test_prefetched_raises_the_producers_error():
    def batches():
        yield [torch.zeros(1)], torch.zeros(1)
        raise OSError("disk gone")

    consumer = prefetched(batches(), 2, "cpu")
    next(consumer)
    with pytest.raises(OSError, match="disk gone"):
        next(consumer)
    assert not prefetch_threads()


def test_stopping_early_ends_the_thread_and_closes_the_batches():
    closed = threading.Event()

    def endless():
        try:
            while True:
                yield [torch.zeros(1)], torch.zeros(1)
        finally:
            closed.set()

    consumer = prefetched(endless(), 2, "cpu")
    next(consumer)
    assert len(prefetch_threads()) == 1
    consumer.close()  # what dropping it, or breaking out of a for loop over it, does
    assert closed.is_set() and not prefetch_threads()


# ---------------------------------------------------------------- on a GPU: the stream, the events, no host sync

@needs_cuda
@pytest.mark.parametrize("decode", ["cpu", "auto"])
def test_gpu_overlap_matches_serial_without_host_syncs(beton, decode):
    options = dict(device="cuda", decode=decode, dtype=torch.bfloat16, **OPTIONS)
    serial = multicrop_loader(beton, 4, overlap=False, **options)
    overlapped = multicrop_loader(beton, 4, batches_ahead=2, **options)
    assert overlapped.overlap and overlapped.crops == "torch" and overlapped.make_views.batched_resize
    reference = epoch(serial, 0)
    assert same_batches(reference, epoch(overlapped, 0))
    batches = overlapped.iter_epoch(1)
    crops, _ = next(batches)  # the first batch makes the device constants (one-off blocking copies)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for crops, labels in batches:
            busy = torch.randn(2048, 2048, device="cuda")
            busy = busy @ busy  # the consumer's stream works on while the next batch is made on the other
            assert crops[0].is_cuda and labels.is_cuda
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert same_batches(epoch(serial, 1), epoch(overlapped, 1))
