"""DINO loss with the official semantics.

Teacher: softmax((t - centre) / tau_t), tau_t warmed up per epoch. Student:
log_softmax(s / tau_s). Cross-entropy over every (teacher view, student view)
pair with different views, averaged. The centre follows an EMA of the teacher's
batch-mean logits, all-reduced across ranks. The arithmetic lives in
`fastdino_kernels.dino_loss`: a fused Triton kernel and its PyTorch twin.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastdino._dispatch import resolve_impl
from fastdino_kernels import dino_loss as dino_loss_kernels

logger = logging.getLogger(__name__)


def teacher_temperature_schedule(warmup_teacher_temp: float, teacher_temp: float,
                                 warmup_teacher_temp_epochs: int, nepochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear warm-up, then constant (official)."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(max(nepochs - warmup_teacher_temp_epochs, 0)) * teacher_temp,
    ))


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, impl: str = "auto", defer_center_update: bool = False):
        """As the official DINOLoss. With `defer_center_update`, forward leaves `center` alone and
        keeps the teacher batch sum until `commit_center()`: a trainer that may still drop the step
        (a non-finite loss) applies it only once the step is known to count."""
        super().__init__()
        self.out_dim = out_dim
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.impl = impl
        self.defer_center_update = defer_center_update
        self._pending_center: tuple[torch.Tensor, int] | None = None
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temperature_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int | None = None, *,
                teacher_temp: float | None = None) -> torch.Tensor:
        """student_output [ncrops*B, K], teacher_output [n_teacher*B, K] -> loss; updates `center`
        (with defer_center_update: prepares the update for `commit_center()`). The teacher
        temperature is the official per-epoch schedule at `epoch`, or `teacher_temp` as given (the
        trainer's schedules own it: fastdino.train.schedules); exactly one of the two is given."""
        if (epoch is None) == (teacher_temp is None):
            raise TypeError("DINOLoss.forward takes either epoch or teacher_temp")
        if teacher_temp is None:
            teacher_temp = self.teacher_temp(epoch)
        if student_output.shape[0] % self.ncrops:
            raise ValueError(f"DINOLoss: {student_output.shape[0]} student rows do not split into {self.ncrops} crops")
        impl = resolve_impl("DINOLoss", self.impl, dino_loss_kernels._dino_loss_fwd_kernel, student_output.device,
                            logger)
        loss_fn = dino_loss_kernels.dino_loss if impl == "triton" else dino_loss_kernels.dino_loss_reference
        loss, teacher_sum = loss_fn(student_output, teacher_output, self.center.view(-1),
                                    self.student_temp, teacher_temp)
        self._pending_center = (teacher_sum, teacher_output.shape[0])
        if not self.defer_center_update:
            self.commit_center()
        return loss

    def commit_center(self) -> None:
        """Applies the centre update of the last forward (all-reduced: every rank must call it at
        the same step). A step that is dropped instead simply never commits; the next forward
        replaces the pending update."""
        if self._pending_center is None:
            raise RuntimeError("DINOLoss.commit_center: no forward since the last commit")
        teacher_sum, teacher_rows = self._pending_center
        self._pending_center = None
        self.update_center(teacher_sum, teacher_rows)

    @torch.no_grad()
    def update_center(self, teacher_sum: torch.Tensor, teacher_rows: int) -> None:
        """centre <- m * centre + (1 - m) * mean of the teacher logits over every rank's rows."""
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            teacher_sum = teacher_sum.clone()
            dist.all_reduce(teacher_sum)
            world_size = dist.get_world_size()
        batch_center = teacher_sum.view(1, -1).float() / (teacher_rows * world_size)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
