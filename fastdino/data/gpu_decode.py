"""GPU decode: a batch of stored JPEGs -> one padded uint8 canvas on the GPU, with nvJPEG.

nvImageCodec (`pip install nvidia-nvimgcodec-cu13`, module `nvidia.nvimgcodec`)
decodes the whole batch in one call (nvJPEG's batched hybrid/hardware decoder) on
the current torch stream; each image is then copied into the top-left of a
[B, max_h, max_w, 3] canvas, the layout the CPU decoder yields, so multicrop.py
works on either. Images stored raw (not JPEG) are uploaded as they are.
"""
import numpy as np
import torch


def nvimgcodec_unavailable(device):
    """Why the nvJPEG decode can't run on `device` (a torch.device), or None when it can."""
    if device.type != "cuda":
        return f"the device is {device}, not a CUDA GPU"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError as error:
        return f"nvImageCodec is not installed ({error}; pip install nvidia-nvimgcodec-cu13)"
    return None


class NvJpegDecoder:
    """Decodes batches of `BetonImages(stored_bytes=True)` rows on one GPU."""

    def __init__(self, device, cpu_threads=2):
        device = torch.device(device)
        if reason := nvimgcodec_unavailable(device):
            raise RuntimeError(f"GPU JPEG decode unavailable: {reason}")
        from nvidia import nvimgcodec

        self.nvimgcodec = nvimgcodec
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        # nvJPEG parses headers and Huffman-decodes small images on CPU threads: bound them
        self.decoder = nvimgcodec.Decoder(device_id=self.device.index, max_num_cpu_threads=cpu_threads)

    def __call__(self, rows, sizes):
        """rows: uint8 [B, max_bytes] (CPU); sizes: long [B, 4] as (height, width, byte count, is JPEG).
        Returns uint8 [B, max_h, max_w, 3] on the GPU, image i in its top-left (h, w)."""
        rows, sizes = rows.numpy(), sizes.tolist()
        max_h, max_w = max(s[0] for s in sizes), max(s[1] for s in sizes)
        canvases = torch.empty((len(sizes), max_h, max_w, 3), dtype=torch.uint8, device=self.device)
        jpegs = [i for i, s in enumerate(sizes) if s[3]]
        stream = torch.cuda.current_stream(self.device)
        if jpegs:
            # copies: FFCV reuses its row buffers while the GPU may still be reading
            streams = [self.nvimgcodec.CodeStream(np.array(rows[i, : sizes[i][2]])) for i in jpegs]
            decoded = self.decoder.decode(streams, cuda_stream=stream.cuda_stream)
            for i, image in zip(jpegs, decoded):
                if image is None:
                    raise RuntimeError(f"nvJPEG could not decode image {i} of the batch")
                canvases[i, : sizes[i][0], : sizes[i][1]] = torch.as_tensor(image, device=self.device)
        for i, (height, width, length, is_jpeg) in enumerate(sizes):
            if not is_jpeg:
                pixels = torch.from_numpy(np.ascontiguousarray(rows[i, :length])).view(height, width, 3)
                canvases[i, :height, :width] = pixels.to(self.device, non_blocking=True)
        return canvases
