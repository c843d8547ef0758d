"""The GPU data path: nvJPEG decode through nvImageCodec and batched multi-crop on CUDA, against the CPU path.
Skipped without a CUDA device (and the decode tests without nvImageCodec)."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import convert_folder, multicrop_loader
from fastdino.data import multicrop as mc
from fastdino.data.decode import BetonImages
from fastdino.data.gpu_decode import nvimgcodec_unavailable
from fastdino.data.sample_data import sample_photos

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_nvimgcodec = pytest.mark.skipif(
    not torch.cuda.is_available() or nvimgcodec_unavailable(torch.device("cuda")) is not None,
    reason="needs nvImageCodec (pip install nvidia-nvimgcodec-cu13)")


@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i, photo in enumerate(list(sample_photos().values()) * 2):
        h, w = photo.shape[:2]
        top, left = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
        Image.fromarray(np.ascontiguousarray(photo[top:, left:])).convert("RGB").save(root / "images" / f"{i:03d}.jpg")
    convert_folder(root / "images", root / "photos.beton", max_resolution=256, num_workers=2, progress=False)
    return root / "photos.beton"


@needs_nvimgcodec
def test_nvjpeg_decode_matches_cpu_decode(beton):
    from fastdino.data.gpu_decode import NvJpegDecoder

    cpu = BetonImages(beton, batch_size=16)
    encoded = BetonImages(beton, batch_size=16, stored_bytes=True)
    decoder = NvJpegDecoder("cuda")
    order = np.arange(cpu.num_images)[::-1].copy()
    for (canvases, sizes, labels), (rows, sizes4, labels2) in zip(cpu.batches(order), encoded.batches(order)):
        assert torch.equal(sizes, sizes4[:, :2]) and torch.equal(labels, labels2)
        gpu = decoder(rows, sizes4).cpu()
        for i, (h, w) in enumerate(sizes.tolist()):  # IDCT and chroma upsampling differ a little
            difference = (gpu[i, :h, :w].int() - canvases[i, :h, :w].int()).abs().float()
            assert difference.mean() < 1.5 and difference.max() <= 24, i


def test_batched_gpu_crops_match_cpu_reference(beton):
    images = BetonImages(beton, batch_size=8)
    canvases, sizes, _ = next(images.batches(np.arange(8)))
    canvases = canvases.clone()
    options = dict(n_local_crops=4, global_size=64, local_size=32)
    cpu = mc.multicrop(canvases, sizes, torch.Generator().manual_seed(4), **options)
    gpu = mc.multicrop(canvases, sizes, torch.Generator().manual_seed(4), device="cuda", dtype=torch.bfloat16,
                       **options)
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.dtype == torch.bfloat16 and b.shape == a.shape
        assert (b.float().cpu() - a).abs().mean() < 0.02  # half-precision resampling, bf16 output


@pytest.mark.parametrize("decode", ["cpu", pytest.param("nvjpeg", marks=needs_nvimgcodec)])
def test_gpu_loader_matches_cpu_loader(beton, decode):
    options = dict(n_local_crops=2, global_size=48, local_size=24, seed=9)
    cpu = list(multicrop_loader(beton, 4, crops="torch", **options))
    gpu = multicrop_loader(beton, 4, device="cuda", decode=decode, dtype=torch.bfloat16, **options)
    assert gpu.decode == decode and gpu.crops == "torch"
    for (crops, labels), (crops2, labels2) in zip(cpu, gpu):
        assert torch.equal(labels, labels2.cpu())
        for a, b in zip(crops, crops2):
            assert b.is_cuda and b.dtype == torch.bfloat16
            assert (b.float().cpu() - a).abs().mean() < 0.05  # the same boxes and choices; decoders differ a little
