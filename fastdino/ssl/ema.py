"""EMA teacher update: teacher <- m * teacher + (1 - m) * student, in place."""
from __future__ import annotations

import logging

import torch
from torch import nn

from fastdino._dispatch import resolve_impl
from fastdino_kernels import ema as ema_kernels

logger = logging.getLogger(__name__)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, impl: str = "auto") -> None:
    """Updates every parameter of `teacher` from the same-named parameter of `student`."""
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        missing = sorted(set(student_params) ^ set(teacher_params))
        raise ValueError(f"ema_update_: teacher and student parameters differ, e.g. {missing[:3]}")
    names = list(teacher_params)
    if not names:
        return
    teacher_tensors = [teacher_params[n].data for n in names]
    student_tensors = [student_params[n].data for n in names]
    chosen = resolve_impl("ema_update_", impl, ema_kernels._ema_kernel, teacher_tensors[0].device, logger)
    update = ema_kernels.ema_update_tensors_ if chosen == "triton" else ema_kernels.ema_update_tensors_reference_
    update(teacher_tensors, student_tensors, float(momentum))
