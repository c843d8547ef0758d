"""The parts of a DINO training step built from the config, each in one place: the training
loader, the DINO loss, and the step itself (`DINOMetaArch`: student under its parallel wrapper,
teacher, loss, EMA). `fastdino train` (trainer.py) and `fastdino bench train` both build through
here, so a benchmark times the step that training runs.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch

from fastdino.data.synthetic import SYNTHETIC, SyntheticMultiCrop
from fastdino.parallel import DistEnv, apply_parallelism
from fastdino.ssl import DINOLoss, DINOMetaArch, build_student_teacher

logger = logging.getLogger(__name__)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """precision=bf16, or auto on CUDA: the forward runs under bf16 autocast, crops are made in bf16."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if uses_bf16(device, precision):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_training_loader(cfg, device: torch.device, rank: int = 0, world_size: int = 1):
    """The multi-crop loader of data.path: a .beton (FFCV; `fastdino.data.multicrop_loader`), or
    random crops made on the device for data.path=synthetic. Its `iter_epoch(epoch, start_batch)`
    yields `(crops, labels)`: the official list of 2 + n `[B, 3, H, W]` tensors, globals first."""
    data = cfg.data
    # bf16 crops halve the host-to-device copy (CPU decode) and the crops' memory under bf16 autocast
    dtype = torch.bfloat16 if uses_bf16(device, cfg.precision) else torch.float32
    common = dict(n_local_crops=data.n_local_crops, global_size=data.global_size, local_size=data.local_size,
                  device=str(device), seed=cfg.seed, rank=rank, world_size=world_size, dtype=dtype)
    if data.path == SYNTHETIC:
        logger.info("data.path=synthetic: random crops made on %s, no files read (data.decode, data.crops "
                    "and the augmentations do not apply)", device)
        return SyntheticMultiCrop(data.batch_size, **common)
    from fastdino.data.loader import multicrop_loader

    return multicrop_loader(data.path, data.batch_size, augment=data.augment, num_workers=data.num_workers,
                            decode=data.decode, crops=data.crops, order=data.order, os_cache=data.os_cache,
                            batches_ahead=data.batches_ahead, **common)


def build_dino_loss(cfg, device: torch.device, defer_center_update: bool = False) -> DINOLoss:
    """The DINO loss of cfg.dino over 2 + data.n_local_crops crops (fastdino.ssl.DINOLoss)."""
    dino = cfg.dino
    return DINOLoss(cfg.model.out_dim, 2 + cfg.data.n_local_crops, dino.warmup_teacher_temp, dino.teacher_temp,
                    dino.warmup_teacher_temp_epochs, cfg.optim.epochs, dino.student_temp, dino.center_momentum,
                    impl=dino.loss_impl, defer_center_update=defer_center_update).to(device)


def build_dino_step(cfg, device: torch.device, dist: DistEnv, *, guard_nonfinite: bool = False) -> DINOMetaArch:
    """Student and teacher (cfg.model, the same weights on every rank from the current torch
    seed), moved to `device`, parallelism applied (fastdino.parallel.apply_parallelism: plain
    module or DeepSpeed ZeRO), the loss, the EMA. With `guard_nonfinite` a step may still be
    dropped after its forward (on_nonfinite_loss=skip): the centre update waits for
    `accept` and batch norm statistics are restored when it says no."""
    nets = build_student_teacher(cfg.model)
    # The teacher stays in train mode as in the official code: it only matters for batch norm in
    # the head (use_bn_in_head), where the teacher uses batch statistics.
    runner, teacher = apply_parallelism(
        nets.student.to(device), nets.teacher.to(device), dist, zero_stage=cfg.parallel.zero_stage,
        micro_batch=cfg.data.batch_size, bucket_elements=cfg.parallel.bucket_elements, betas=tuple(cfg.optim.betas),
        clip_grad=cfg.optim.clip_grad, activation_checkpointing=cfg.model.activation_checkpointing,
        compile=cfg.model.compile)
    # The centre moves only once the step is known to count (defer_center_update=True always:
    # the step commits it), so a non-finite teacher output cannot poison it before skip drops the step.
    return DINOMetaArch(runner, teacher, build_dino_loss(cfg, device, defer_center_update=True),
                        ema_impl=cfg.dino.ema_impl, autocast=functools.partial(autocast_context, device, cfg.precision),
                        batchnorm_guard=guard_nonfinite)
