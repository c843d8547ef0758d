"""The GPU data path: nvJPEG decode through nvImageCodec and batched multi-crop on CUDA, against the CPU path.

How `decode=auto` decides (by decoding a test JPEG on the device) is tested everywhere; the
tests that decode on a GPU skip without CUDA (and without a working nvImageCodec + nvJPEG),
and those over a .beton also skip without FFCV (some GPU hosts cannot build it).
"""
import io
import logging
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.data import gpu_decode
from fastdino.data import multicrop as mc
from fastdino.data.gpu_decode import jpeg_rows, nvimgcodec_status, nvimgcodec_unavailable, probe_jpeg
from fastdino.data.sample_data import sample_photos

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_nvimgcodec = pytest.mark.skipif(
    not torch.cuda.is_available() or nvimgcodec_unavailable(torch.device("cuda")) is not None,
    reason="needs nvImageCodec + nvJPEG decoding on the GPU (pip install -e .[gpu])")


# ---------------------------------------------------------------- the decision, everywhere

def test_not_a_cuda_device():
    assert nvimgcodec_status(torch.device("cpu")) == (False, "the device is cpu, not a CUDA GPU")
    assert "not a CUDA GPU" in nvimgcodec_unavailable("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_no_cuda():
    assert nvimgcodec_unavailable(torch.device("cuda")) == "CUDA is not available"


def test_probe_image_is_a_small_jpeg_of_coloured_blocks():
    data, pixels = probe_jpeg()
    assert data[:2] == b"\xff\xd8" and len(data) < 2000
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert decoded.shape == pixels.shape == (32, 32, 3)
    centres = (slice(8, None, 16), slice(8, None, 16))
    assert np.abs(decoded[centres] - pixels[centres]).max() <= gpu_decode.PROBE_TOLERANCE


class FakeImage:
    def __init__(self, buffer_kind, pixels):
        self.buffer_kind, self.pixels = buffer_kind, pixels


@pytest.fixture
def stand_in(monkeypatch):
    """A stand-in for `nvidia.nvimgcodec` on a machine that claims CUDA, to test only how a
    failed or wrong test decode turns into the CPU fallback and its reason (the real decode
    is tested on a GPU below). `stand_in.result` is what its decode returns or raises;
    the decoded image's pixels are read back by the patched `_to_host`."""
    module = types.SimpleNamespace(
        __version__="0.0-stand-in", calls=[], result=None,
        BackendKind=types.SimpleNamespace(CPU_ONLY="CPU_ONLY", GPU_ONLY="GPU_ONLY", HYBRID_CPU_GPU="HYBRID_CPU_GPU",
                                          HW_GPU_ONLY="HW_GPU_ONLY"),
        ImageBufferKind=types.SimpleNamespace(STRIDED_DEVICE="STRIDED_DEVICE", STRIDED_HOST="STRIDED_HOST"))
    module.Backend = lambda kind, load_hint=1.0: (kind, load_hint)
    module.CodeStream = lambda array: bytes(array)

    class Decoder:
        def __init__(self, device_id, max_num_cpu_threads, backends):
            module.calls.append(("Decoder", device_id, tuple(backends)))

        def decode(self, code_streams, cuda_stream):
            module.calls.append(("decode", [stream[:2] for stream in code_streams]))
            if isinstance(module.result, Exception):
                raise module.result
            return [module.result]

    module.Decoder = Decoder
    monkeypatch.setitem(sys.modules, "nvidia", types.SimpleNamespace(nvimgcodec=module))
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode, "_verdicts", {})
    monkeypatch.setattr(gpu_decode, "_stream_handle", lambda device: 0)
    monkeypatch.setattr(gpu_decode, "_to_host", lambda image, device: image.pixels)
    monkeypatch.setattr(gpu_decode, "_nvjpeg_hint", lambda nvimgcodec: "; <hint>")
    return module


def test_only_gpu_backends_are_allowed(stand_in):
    stand_in.result = FakeImage("STRIDED_DEVICE", probe_jpeg()[1])
    assert nvimgcodec_status(torch.device("cuda:0"))[0]
    (_, device_id, backends), (_, magics) = stand_in.calls
    assert device_id == 0 and magics == [b"\xff\xd8"]
    assert [kind for kind, _ in backends] == ["HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU"]


def test_a_good_decode_is_usable_and_cached_per_device(stand_in):
    stand_in.result = FakeImage("STRIDED_DEVICE", probe_jpeg()[1])
    usable, reason = nvimgcodec_status(torch.device("cuda:0"))
    assert usable and reason.startswith("nvImageCodec 0.0-stand-in decoded a 32x32 test JPEG on cuda:0")
    assert nvimgcodec_unavailable(torch.device("cuda:0")) is None
    assert len(stand_in.calls) == 2  # decided once
    nvimgcodec_status(torch.device("cuda:1"))
    assert len(stand_in.calls) == 4


@pytest.mark.parametrize("result, expected", [
    (None, "nvImageCodec's GPU backends did not decode a 32x32 test JPEG on cuda:0; <hint>"),
    (RuntimeError("Internal error - Could not create decoder.\nmore"),
     "nvImageCodec failed to decode a 32x32 test JPEG on cuda:0 (RuntimeError: Internal error - Could not create "
     "decoder.); <hint>"),
    (FakeImage("STRIDED_HOST", None), "into host memory (STRIDED_HOST), not the GPU"),
    (FakeImage("STRIDED_DEVICE", np.zeros((16, 16, 3), np.uint8)), "to shape (16, 16, 3), expected (32, 32, 3)"),
    (FakeImage("STRIDED_DEVICE", np.zeros((32, 32, 3), np.uint8)), "to wrong colours (off by up to 255 of 255)"),
])
def test_a_failed_or_wrong_decode_means_cpu_decode(stand_in, result, expected):
    stand_in.result = result
    usable, reason = nvimgcodec_status(torch.device("cuda:0"))
    assert not usable and expected in reason and "\n" not in reason
    assert nvimgcodec_unavailable(torch.device("cuda:0")) == reason


def test_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # makes the import fail
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_decode, "_verdicts", {})
    assert nvimgcodec_unavailable(torch.device("cuda:0")).startswith("nvImageCodec is not installed (")


def test_the_hint_names_a_missing_nvjpeg_library(tmp_path, monkeypatch):
    package = tmp_path / "nvidia" / "nvimgcodec"
    package.mkdir(parents=True)
    module = types.SimpleNamespace(__file__=str(package / "__init__.py"))
    monkeypatch.setattr("ctypes.CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert gpu_decode._nvjpeg_hint(module) == ("; the nvJPEG library (libnvjpeg.so.13) is missing: "
                                               "pip install nvidia-nvjpeg")
    (tmp_path / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (tmp_path / "nvidia" / "cu13" / "lib" / "libnvjpeg.so.13").touch()  # where nvImageCodec's wheel looks
    assert gpu_decode._nvjpeg_hint(module) == ""


def test_pick_paths_logs_the_decision(stand_in, caplog):
    loader = pytest.importorskip("fastdino.data.loader", reason="the loader reads .beton files through FFCV")
    stand_in.result = None
    with caplog.at_level(logging.INFO, logger="fastdino.data.loader"):
        assert loader.pick_paths("cuda:0", "auto", "torch")[1] == "cpu"
    assert "JPEG decode auto -> cpu (nvImageCodec's GPU backends did not decode" in caplog.text
    with pytest.raises(ValueError, match="decode=nvjpeg can't run: nvImageCodec's GPU backends did not decode"):
        loader.pick_paths("cuda:0", "nvjpeg", "torch")


def test_jpeg_rows_layout():
    rows, sizes = jpeg_rows([b"\xff\xd8ab", b"\xff\xd8abcdef"], [(3, 4), (5, 6)])
    assert rows.dtype == torch.uint8 and rows.shape == (2, 8)
    assert bytes(rows[0, :4].tolist()) == b"\xff\xd8ab" and rows[0, 4:].eq(0).all()
    assert sizes.tolist() == [[3, 4, 4, 1], [5, 6, 8, 1]]


# ---------------------------------------------------------------- on a GPU

def assert_decodes_alike(got, expected, what):
    """Two decodes of one JPEG agree up to their IDCTs and chroma upsampling (nvJPEG's hardware
    engine need not upsample chroma as libjpeg-turbo's 'fancy' filter does, which moves pixels
    at sharp colour edges): a small mean difference, and few pixels far off."""
    difference = (got.int() - expected.int()).abs().float()
    assert difference.mean() < 1.5, (what, difference.mean())
    assert (difference > 24).float().mean() < 0.005, (what, (difference > 24).float().mean())


def photo_jpegs(count=8, seed=0):
    """(JPEG bytes, PIL-decoded pixels) of random crops of scikit-image's photos."""
    rng = np.random.default_rng(seed)
    photos = list(sample_photos().values())
    blobs, decoded = [], []
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        top, left = int(rng.integers(0, h // 3)), int(rng.integers(0, w // 3))
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photo[top:, left:])).convert("RGB").save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
        decoded.append(np.asarray(Image.open(io.BytesIO(blobs[-1])).convert("RGB")))
    return blobs, decoded


@needs_cuda
def test_the_probe_decides_on_this_gpu():
    usable, reason = nvimgcodec_status(torch.device("cuda"))
    if usable:
        assert "decoded a 32x32 test JPEG on cuda:" in reason
    else:
        assert reason and "\n" not in reason


@needs_nvimgcodec
def test_nvjpeg_decode_of_jpeg_bytes_matches_pil():
    from fastdino.data.gpu_decode import NvJpegDecoder

    blobs, decoded = photo_jpegs()
    rows, sizes = jpeg_rows(blobs, [d.shape[:2] for d in decoded])
    canvases = NvJpegDecoder("cuda")(rows, sizes)
    assert canvases.is_cuda and canvases.shape == (len(blobs), *np.max([d.shape for d in decoded], axis=0))
    for i, expected in enumerate(decoded):
        h, w = expected.shape[:2]
        assert_decodes_alike(canvases[i, :h, :w].cpu(), torch.from_numpy(expected), i)


@needs_nvimgcodec
def test_nvjpeg_decoder_takes_jpeg_and_raw_rows_in_one_batch():
    from fastdino.data.gpu_decode import NvJpegDecoder

    blobs, decoded = photo_jpegs(3)
    raw = np.ascontiguousarray(decoded[1][:37, :53])  # stored as RGB rows, between two JPEGs
    shapes = [decoded[0].shape[:2], raw.shape[:2], decoded[2].shape[:2]]
    rows, sizes = jpeg_rows([blobs[0], raw.tobytes(), blobs[2]], shapes)
    sizes[1, 3] = 0
    decoder = NvJpegDecoder("cuda")
    canvases = decoder(rows, sizes).cpu()
    assert torch.equal(canvases[1, :37, :53], torch.from_numpy(raw))
    for i in (0, 2):
        h, w = decoded[i].shape[:2]
        assert_decodes_alike(canvases[i, :h, :w], torch.from_numpy(decoded[i]), i)
    again = decoder(rows, sizes).cpu()  # the pinned staging buffers are reused safely (the padding is not written)
    assert all(torch.equal(again[i, :h, :w], canvases[i, :h, :w]) for i, (h, w) in enumerate(shapes))


@needs_cuda
def test_batched_gpu_crops_match_cpu_reference():
    _, decoded = photo_jpegs()
    sizes = torch.tensor([d.shape[:2] for d in decoded], dtype=torch.long)
    canvases = torch.zeros((len(decoded), *sizes.max(0).values.tolist(), 3), dtype=torch.uint8)
    for i, pixels in enumerate(decoded):
        canvases[i, : pixels.shape[0], : pixels.shape[1]] = torch.from_numpy(pixels)
    options = dict(n_local_crops=4, global_size=64, local_size=32)
    cpu = mc.multicrop(canvases, sizes, torch.Generator().manual_seed(4), **options)
    gpu = mc.multicrop(canvases, sizes, torch.Generator().manual_seed(4), device="cuda", dtype=torch.bfloat16,
                       **options)
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.dtype == torch.bfloat16 and b.shape == a.shape
        assert (b.float().cpu() - a).abs().mean() < 0.02  # half-precision resampling, bf16 output


# ---------------------------------------------------------------- on a GPU, over a .beton (FFCV)

@pytest.fixture(scope="module")
def beton(tmp_path_factory):
    pytest.importorskip("fastdino.data.decode", reason="reading a .beton needs FFCV")
    from fastdino.data import convert_folder

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
    from fastdino.data.decode import BetonImages
    from fastdino.data.gpu_decode import NvJpegDecoder

    cpu = BetonImages(beton, batch_size=16)
    encoded = BetonImages(beton, batch_size=16, stored_bytes=True)
    decoder = NvJpegDecoder("cuda")
    order = np.arange(cpu.num_images)[::-1].copy()
    for (canvases, sizes, labels), (rows, sizes4, labels2) in zip(cpu.batches(order), encoded.batches(order)):
        assert torch.equal(sizes, sizes4[:, :2]) and torch.equal(labels, labels2)
        gpu = decoder(rows, sizes4).cpu()
        for i, (h, w) in enumerate(sizes.tolist()):
            assert_decodes_alike(gpu[i, :h, :w], canvases[i, :h, :w], i)


@needs_cuda
@pytest.mark.parametrize("decode", ["cpu", pytest.param("nvjpeg", marks=needs_nvimgcodec)])
def test_gpu_loader_matches_cpu_loader(beton, decode):
    from fastdino.data import multicrop_loader

    options = dict(n_local_crops=2, global_size=48, local_size=24, seed=9)
    cpu = list(multicrop_loader(beton, 4, crops="torch", **options))
    gpu = multicrop_loader(beton, 4, device="cuda", decode=decode, dtype=torch.bfloat16, **options)
    assert gpu.decode == decode and gpu.crops == "torch"
    for (crops, labels), (crops2, labels2) in zip(cpu, gpu):
        assert torch.equal(labels, labels2.cpu())
        for a, b in zip(crops, crops2):
            assert b.is_cuda and b.dtype == torch.bfloat16
            assert (b.float().cpu() - a).abs().mean() < 0.05  # the same boxes and choices; decoders differ a little
