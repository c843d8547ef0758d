"""Per-step schedules, precomputed as the official code does."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastdino.ssl.loss import teacher_temperature_schedule


def cosine_schedule(base_value: float, final_value: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warm-up from start_warmup_value to base_value, then cosine to final_value.
    One value per optimizer step: epochs * steps_per_epoch of them."""
    total = epochs * steps_per_epoch
    warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps) if warmup_steps > 0 else np.array([])
    steps = np.arange(total - warmup_steps)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate((warmup, cosine))


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray  # per epoch
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict:
        epoch = step // self.steps_per_epoch
        return {
            "lr": float(self.lr[step]),
            "wd": float(self.weight_decay[step]),
            "momentum": float(self.momentum[step]),
            "teacher_temp": float(self.teacher_temp[min(epoch, len(self.teacher_temp) - 1)]),
            "epoch": epoch,
        }


def build_schedules(cfg, steps_per_epoch: int, total_batch_size: int) -> Schedules:
    """lr scaled linearly by total batch / 256 (official), wd cosine, EMA momentum cosine to 1."""
    optim, dino = cfg.optim, cfg.dino
    peak_lr = optim.lr * total_batch_size / 256.0
    return Schedules(
        lr=cosine_schedule(peak_lr, optim.min_lr, optim.epochs, steps_per_epoch, optim.warmup_epochs),
        weight_decay=cosine_schedule(optim.weight_decay, optim.weight_decay_end, optim.epochs, steps_per_epoch),
        momentum=cosine_schedule(dino.momentum_teacher, 1.0, optim.epochs, steps_per_epoch),
        teacher_temp=teacher_temperature_schedule(dino.warmup_teacher_temp, dino.teacher_temp,
                                                  dino.warmup_teacher_temp_epochs, optim.epochs),
        steps_per_epoch=steps_per_epoch,
    )
