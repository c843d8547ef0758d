"""GPU decode: a batch of stored JPEGs -> one padded uint8 canvas on the GPU, with nvJPEG.

nvImageCodec (`pip install -e .[gpu]`: `nvidia-nvimgcodec-cu13` and the nvJPEG library
`nvidia-nvjpeg`, module `nvidia.nvimgcodec`) decodes the whole batch in one call on the
current torch stream; each image is then copied into the top-left of a
[B, max_h, max_w, 3] canvas, the layout the CPU decoder yields, so multicrop.py works
on either. Images stored raw (not JPEG) are uploaded as they are.

Whether the GPU decode works is decided by decoding, not by importing:
`nvidia.nvimgcodec` imports without the nvJPEG library (it only prints "Failed to load
nvjpeg library") and then has no GPU decoder, and with its default backends nvImageCodec
may decode with its CPU codecs (libjpeg-turbo, OpenCV) instead, falling back from one
backend to the next. So both the check and `NvJpegDecoder` allow only nvImageCodec's GPU
backends (the hardware JPEG engine, nvJPEG's CUDA decoder, nvJPEG's hybrid CPU-Huffman +
GPU decoder), and the check decodes a tiny JPEG on the device and compares the pixels it
gets back there.
"""
import io

import numpy as np
import torch

# nvImageCodec's backend kinds that decode on the GPU, in its own names, with their load
# hints: the hardware engine takes 90% of a batch and the CUDA decoders the rest and its
# failures, the default of NVIDIA's nvImageCodec-based DALI decoder (hw_decoder_load=0.9).
# CPU_ONLY is left out.
GPU_BACKENDS = (("HW_GPU_ONLY", 0.9), ("GPU_ONLY", 1.0), ("HYBRID_CPU_GPU", 1.0))
# The probe image: 2 x 2 blocks of these colours (RGB), 16 px each, saved as a JPEG.
PROBE_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))
PROBE_BLOCK = 16
PROBE_TOLERANCE = 40  # per channel, at the centre of each block: JPEG blurs only the edges

_verdicts = {}  # device -> (usable, one-line reason), decided once per process


def gpu_backends(nvimgcodec):
    """nvImageCodec `Backend`s for GPU decoding only (those this nvImageCodec version has)."""
    kinds = nvimgcodec.BackendKind
    return [nvimgcodec.Backend(getattr(kinds, name), load_hint=hint)
            for name, hint in GPU_BACKENDS if hasattr(kinds, name)]


def probe_jpeg():
    """(JPEG bytes, expected uint8 pixels [H, W, 3]) of a small image of coloured blocks, made with PIL."""
    from PIL import Image

    blocks = np.array(PROBE_COLOURS, dtype=np.uint8).reshape(2, 2, 3)
    pixels = blocks.repeat(PROBE_BLOCK, axis=0).repeat(PROBE_BLOCK, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), pixels


def nvimgcodec_status(device):
    """(usable, reason): whether nvJPEG through nvImageCodec decodes on `device` (a torch.device),
    found by decoding a tiny JPEG there with GPU backends only. The reason is one line either
    way. Decided once per device and process."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the device is {device}, not a CUDA GPU"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _verdicts:
        _verdicts[device] = _probe(device)
    return _verdicts[device]


def nvimgcodec_unavailable(device):
    """Why the nvJPEG decode can't run on `device` (a torch.device), or None when it can."""
    usable, reason = nvimgcodec_status(device)
    return None if usable else reason


def _probe(device):
    try:
        from nvidia import nvimgcodec
    except ImportError as error:
        return False, f"nvImageCodec is not installed ({error}; pip install -e .[gpu])"
    except Exception as error:  # noqa: BLE001  (its compiled part failed to load: no GPU decode either)
        return False, f"nvImageCodec does not load ({type(error).__name__}: {error})"
    data, expected = probe_jpeg()
    where = f"a {expected.shape[1]}x{expected.shape[0]} test JPEG on {device}"
    try:
        decoder = nvimgcodec.Decoder(device_id=device.index, max_num_cpu_threads=1, backends=gpu_backends(nvimgcodec))
        # a batch of one, through the batched call NvJpegDecoder makes
        image, = decoder.decode([nvimgcodec.CodeStream(np.frombuffer(data, np.uint8))],
                                cuda_stream=_stream_handle(device))
        if image is None:
            return False, f"nvImageCodec's GPU backends did not decode {where}{_nvjpeg_hint(nvimgcodec)}"
        if image.buffer_kind != nvimgcodec.ImageBufferKind.STRIDED_DEVICE:
            return False, f"nvImageCodec decoded {where} into host memory ({image.buffer_kind}), not the GPU"
        got = _to_host(image, device)
    except Exception as error:  # noqa: BLE001  (any failure means: no GPU decode here; say which)
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return False, (f"nvImageCodec failed to decode {where} ({type(error).__name__}: {message})"
                       f"{_nvjpeg_hint(nvimgcodec)}")
    if got.shape != expected.shape:
        return False, f"nvImageCodec decoded {where} to shape {got.shape}, expected {expected.shape}"
    half = PROBE_BLOCK // 2
    centres = got[half::PROBE_BLOCK, half::PROBE_BLOCK].astype(int)
    worst = int(np.abs(centres - expected[half::PROBE_BLOCK, half::PROBE_BLOCK]).max())
    if worst > PROBE_TOLERANCE:
        return False, f"nvImageCodec decoded {where} to wrong colours (off by up to {worst} of 255)"
    return True, (f"nvImageCodec {getattr(nvimgcodec, '__version__', '?')} decoded {where} with its GPU "
                  f"backends (nvJPEG), colours within {worst} of 255")


def _stream_handle(device):
    """The current torch stream of `device`, as the integer nvImageCodec takes (NvJpegDecoder decodes on it too)."""
    return torch.cuda.current_stream(device).cuda_stream


def _to_host(image, device):
    """A decoded nvImageCodec image's pixels as a numpy array, read the way NvJpegDecoder reads them:
    torch.as_tensor through its CUDA array interface, on `device` (this also waits for the decode)."""
    return torch.as_tensor(image, device=device).cpu().numpy()


def _nvjpeg_hint(nvimgcodec):
    """'; <why>' when nvJPEG's library is not where nvImageCodec's wheel looks for it, else ''."""
    import ctypes
    from pathlib import Path

    # The wheel's nvJPEG plugin searches ../cu13/lib next to the nvidia/ folder (nvidia-nvjpeg's
    # place), then the system's library paths.
    package = Path(getattr(nvimgcodec, "__file__", "") or ".").parent
    if list(package.parent.glob("cu*/lib/libnvjpeg.so*")):
        return ""
    try:
        ctypes.CDLL("libnvjpeg.so.13")
        return ""
    except OSError:
        return "; the nvJPEG library (libnvjpeg.so.13) is missing: pip install nvidia-nvjpeg"


def jpeg_rows(blobs, shapes):
    """Encoded images packed as NvJpegDecoder reads them (the layout of decode.StoredBytes):
    blobs: JPEG bytes per image; shapes: (height, width) per image. Returns rows uint8
    [B, max_bytes] and sizes long [B, 4] as (height, width, byte count, is JPEG = 1)."""
    rows = torch.zeros((len(blobs), max(len(b) for b in blobs)), dtype=torch.uint8)
    for i, blob in enumerate(blobs):
        rows[i, : len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    sizes = torch.tensor([(h, w, len(b), 1) for b, (h, w) in zip(blobs, shapes)], dtype=torch.long)
    return rows, sizes


class NvJpegDecoder:
    """Decodes batches of `BetonImages(stored_bytes=True)` rows on one GPU, on the current CUDA stream.

    nvImageCodec's GPU backends only (GPU_BACKENDS: the hardware JPEG engine first, where the GPU
    has one). Each batch's stored bytes are copied once into a pinned buffer (FFCV reuses its own
    row buffers), decoded as one nvImageCodec batch, and every image is moved into the batch's
    canvas by one torch call (`_foreach_copy_`).
    """

    def __init__(self, device, cpu_threads=2):
        device = torch.device(device)
        if reason := nvimgcodec_unavailable(device):
            raise RuntimeError(f"GPU JPEG decode unavailable: {reason}")
        from nvidia import nvimgcodec

        self.nvimgcodec = nvimgcodec
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        # nvJPEG parses headers and Huffman-decodes small images on CPU threads: bound them.
        # GPU backends only: a CPU fallback would be a silent slow path.
        self.decoder = nvimgcodec.Decoder(device_id=self.device.index, max_num_cpu_threads=cpu_threads,
                                          backends=gpu_backends(nvimgcodec))
        self.in_use = None  # the previous batch's decoded images, freed once the next batch is queued

    def __call__(self, rows, sizes):
        """rows: uint8 [B, max_bytes] (CPU); sizes: long [B, 4] as (height, width, byte count, is JPEG).
        Returns uint8 [B, max_h, max_w, 3] on the GPU, image i in its top-left (h, w)."""
        shapes = sizes.tolist()
        heights, widths, lengths = (sizes[:, i] for i in range(3))
        canvases = torch.empty((len(shapes), int(heights.max()), int(widths.max()), 3), dtype=torch.uint8,
                               device=self.device)
        staged = torch.empty((len(shapes), int(lengths.max())), dtype=torch.uint8, pin_memory=True)
        staged.copy_(torch.as_tensor(rows)[:, : staged.shape[1]])
        stream = torch.cuda.current_stream(self.device)
        host, jpegs = staged.numpy(), [i for i, shape in enumerate(shapes) if shape[3]]
        decoded = self.decoder.decode([self.nvimgcodec.CodeStream(host[i, : shapes[i][2]]) for i in jpegs],
                                      cuda_stream=stream.cuda_stream) if jpegs else []
        if len(decoded) != len(jpegs) or any(image is None for image in decoded):
            raise RuntimeError(f"nvJPEG could not decode {len(jpegs) - sum(i is not None for i in decoded)} of the "
                               f"batch's {len(jpegs)} JPEGs")
        sources = [torch.as_tensor(image, device=self.device) for image in decoded]
        raw = [i for i, shape in enumerate(shapes) if not shape[3]]
        if raw:  # stored as RGB rows: all rows to the GPU in one copy
            on_device = staged.to(self.device, non_blocking=True)
            sources += [on_device[i, : shapes[i][0] * shapes[i][1] * 3].view(*shapes[i][:2], 3) for i in raw]
        else:
            # a one-byte copy from the staged bytes, queued after the decode: torch's caching host
            # allocator then keeps them until the stream has passed the decode, whatever it reads late
            staged[:1, :1].to(self.device, non_blocking=True)
        torch._foreach_copy_([canvases[i, : shapes[i][0], : shapes[i][1]] for i in jpegs + raw], sources)
        self.in_use = decoded
        return canvases
