"""TensorBoard events of a training run (`logging.tensorboard`), next to log.jsonl.

What log.jsonl records goes to TensorBoard too, under `train/<key>` at the record's step
(loss, lr, wd, momentum, teacher temperature, img/s, MFU, the collapse monitor), k-NN
accuracy under `knn/`, and at every k-NN point a picture of the teacher's last-block CLS
attention, head by head, on a fixed photo (scikit-image's astronaut), so that objects
emerging can be watched while the run trains. Only rank 0 writes. Where the tensorboard
package is not installed, one line says so and the run goes on without it.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

EVENTS_DIR = "tensorboard"
ATTENTION_PHOTO = "astronaut"


class TensorBoardLog:
    """Writes a run's scalars and attention pictures to `<run_dir>/tensorboard`; a no-op when
    `enabled` is false or tensorboard cannot be imported (then it logs one line why)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        self._photo = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            logger.warning("logging.tensorboard: not written, tensorboard cannot be imported (%s; "
                           "pip install tensorboard, or set logging.tensorboard=false)", str(error).splitlines()[0])
            return
        self.writer = SummaryWriter(str(Path(run_dir) / EVENTS_DIR))
        logger.info("TensorBoard events in %s (tensorboard --logdir %s)", Path(run_dir) / EVENTS_DIR, run_dir)

    def record(self, record: dict) -> None:
        """Every finite number of one log.jsonl training record, at its step."""
        if self.writer is None:
            return
        for key, value in record.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, record["step"])
        self.writer.add_scalar("train/collapse_warnings", len(record.get("collapse_warnings", [])), record["step"])

    @torch.no_grad()
    def knn(self, record: dict, backbone: torch.nn.Module, patch_size: int, size: int) -> None:
        """k-NN accuracy of one evaluation record, and the teacher `backbone`'s attention picture
        (`size` px photo, one panel per head, brighter = more attention) at its step."""
        if self.writer is None:
            return
        for key in ("knn_top1", "knn_top5"):
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"knn/{key.removeprefix('knn_')}", record[key], record["step"])
        self.writer.add_image("attention/last_block_heads", self._attention_picture(backbone, patch_size, size),
                              record["step"], dataformats="HWC")
        self.writer.flush()

    def _attention_picture(self, backbone, patch_size: int, size: int) -> np.ndarray:
        """float HWC in [0, 1]: the photo, then each head's attention map upsampled to it."""
        from fastdino.data.sample_data import sample_photos
        from fastdino.eval.attention_maps import last_attention_maps
        from fastdino.eval.draw import prepare

        if self._photo is None:
            self._photo = sample_photos()[ATTENTION_PHOTO]
        pixels, image = prepare(self._photo, size, patch_size)
        maps = last_attention_maps(backbone, image, patch_size)  # [heads, h/p, w/p]
        maps = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        maps = F.interpolate(maps[:, None], size=pixels.shape[:2], mode="nearest")[:, 0]
        panels = [torch.from_numpy(pixels.copy()).float() / 255.0] + [m[..., None].expand(-1, -1, 3) for m in maps]
        return torch.cat(panels, dim=1).numpy()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
