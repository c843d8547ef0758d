"""Student and teacher networks, the DINO step over them, and the optimizer parameter groups.

The backbone (fastdino.models) knows nothing of DINO: this module wraps it with a
DINOHead, runs multi-crop lists through it, builds the EMA teacher, decides which
parameters get weight decay, and holds the one DINO step (`DINOMetaArch`) that the
trainer and `fastdino bench train` both run.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from fastdino import models
from fastdino.ssl.ema import ema_update_
from fastdino.ssl.loss import DINOLoss


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crops (official layout: `backbone.*`, `head.*`).

    Consecutive crops of the same resolution form one batch. With `packed`, all those
    batches go through the backbone in one packed pass (`VisionTransformer.forward_packed`);
    without it, one backbone forward per resolution, as the official code does. The head
    runs once over every CLS embedding. Output rows are crop-major: `[len(crops) * B, K]`.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, packed: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.packed = packed

    def forward(self, crops: list[torch.Tensor] | torch.Tensor, return_backbone: bool = False):
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        batches = [torch.cat(list(same_size)) for _, same_size in itertools.groupby(crops, key=lambda c: c.shape[-2:])]
        if self.packed and len(batches) > 1:
            features = self.backbone.forward_packed(batches)
        else:
            features = torch.cat([self.backbone(batch) for batch in batches])
        logits = self.head(features)
        return (logits, features) if return_backbone else logits


def build_backbone(model_cfg, drop_path_rate: float | None = None) -> nn.Module:
    factory = getattr(models, model_cfg.arch)
    rate = model_cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    # Configs saved by older runs (checkpoints) lack drop_path_impl; it only matters in training.
    return factory(patch_size=model_cfg.patch_size, img_size=[model_cfg.img_size], depth=model_cfg.depth,
                   drop_path_rate=rate, attn_backend=model_cfg.attn_backend,
                   drop_path_impl=getattr(model_cfg, "drop_path_impl", "subset"))


@dataclass
class StudentTeacher:
    student: MultiCropWrapper
    teacher: MultiCropWrapper


def build_student_teacher(model_cfg) -> StudentTeacher:
    """Student with drop path; teacher without, starting from the student's weights, frozen.
    Both run multi-crop lists packed into one forward where `model_cfg.packed_crops` says so.
    Activation checkpointing and torch.compile (model.activation_checkpointing, model.compile)
    are wrappers, applied with the others by fastdino.parallel.apply_parallelism.
    """
    def make(drop_path_rate: float) -> MultiCropWrapper:
        backbone = build_backbone(model_cfg, drop_path_rate)
        head = models.DINOHead(backbone.embed_dim, model_cfg.out_dim, use_bn=model_cfg.use_bn_in_head,
                               norm_last_layer=model_cfg.norm_last_layer, nlayers=model_cfg.head_nlayers,
                               hidden_dim=model_cfg.head_hidden_dim, bottleneck_dim=model_cfg.head_bottleneck_dim)
        return MultiCropWrapper(backbone, head, packed=model_cfg.packed_crops)

    student = make(model_cfg.drop_path_rate)
    teacher = make(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return StudentTeacher(student, teacher)


def compile_blocks(backbone: nn.Module) -> None:
    """torch.compile the transformer blocks in place (`nn.Module.compile`), which keeps the
    state_dict free of the `_orig_mod.` prefix a compiled wrapper module would add.

    A block without stochastic depth (the teacher's, the student's first) compiles whole: its
    shapes are the same every step. In a block with stochastic depth the kept subsets change
    size every step and every block has its own rate, so a whole-block graph would recompile
    until dynamo's recompile limit and then run eagerly; there only the MLP (where compile's
    fusion pays: bias + GELU) is compiled, with dynamic shapes, one graph for every block.
    """
    for block in backbone.blocks:
        if block.drop_path_prob > 0.0:
            block.mlp.compile(dynamic=True)
        else:
            block.compile()


def param_groups(model: nn.Module) -> list[dict]:
    """The official split (biases and 1-D parameters get no weight decay), with the head's
    last layer in groups of its own, as `fastdino.parallel.DINOAdamW` wants them. Tags:
    `decay` (takes the weight-decay schedule) and `last_layer` (frozen during the first
    optim.freeze_last_layer epochs: DINOAdamW skips groups whose `frozen` is set). Empty
    groups are left out."""
    groups = {(decay, last): [] for decay in (True, False) for last in (False, True)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name.endswith(".bias") or param.ndim <= 1)
        groups[(decay, "last_layer" in name)].append(param)
    return [{"params": params, "decay": decay, "last_layer": last, "frozen": False,
             "weight_decay": 0.0} for (decay, last), params in groups.items() if params]


def batchnorm_buffers(*modules: nn.Module) -> list[torch.Tensor]:
    """Running statistics of every batch norm in `modules` (the DINO head's, with model.use_bn_in_head)."""
    return [buffer for module in modules for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for buffer in m.buffers()]


def no_stages(name: str) -> ContextManager:
    """The stage hook of a step nobody times."""
    return contextlib.nullcontext()


@dataclass
class StepOutputs:
    """What one `DINOMetaArch.forward_backward` computed. `loss` is a 0-d tensor on the device
    (not synchronised); outputs are `[ncrops * B, K]` (student) and `[2 * B, K]` (teacher);
    `teacher_features` are the teacher's CLS embeddings `[2 * B, D]`; `accepted` says whether
    the step's update went ahead (backward ran and the centre moved)."""
    loss: torch.Tensor
    student_output: torch.Tensor
    teacher_output: torch.Tensor
    teacher_features: torch.Tensor
    accepted: bool


class DINOMetaArch:
    """One DINO step (paper Alg. 1; official main_dino.py train_one_epoch; dinov2's
    SSLMetaArch.forward_backward / update_teacher): the student runner (the plain module or a
    DeepSpeed engine, from fastdino.parallel.apply_parallelism), the EMA teacher, the DINO loss.

    `forward_backward(crops, teacher_temp)`: teacher forward on the 2 global crops (no grad),
    student forward on every crop, loss at the schedule's teacher temperature, then, if the step
    is accepted, the centre update and backward. `optimizer_step()`: per-parameter clipping, the
    last-layer freeze, AdamW, gradients cleared (the runner's optimizer). `update_teacher(m)`:
    teacher <- m * teacher + (1 - m) * student over all parameters. `stage(name)` wraps each part
    (names: teacher_forward, student_forward, loss, backward, optimizer, ema) so that a benchmark
    times or profiles the very step training runs. `autocast` is the forward's precision context
    factory (bf16 autocast on CUDA, nothing on the CPU).
    """

    STAGES = ("teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema")

    def __init__(self, runner, teacher: MultiCropWrapper, dino_loss: DINOLoss, *, ema_impl: str = "auto",
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 batchnorm_guard: bool = False):
        self.runner, self.teacher, self.dino_loss = runner, teacher, dino_loss
        self.student: MultiCropWrapper = runner.module
        self.ema_impl, self.autocast = ema_impl, autocast
        # Batch norm updates running statistics in the forward, before a step can be judged: with
        # a guard they are copied first and put back when the step is dropped.
        self._batchnorm_buffers = batchnorm_buffers(self.student, self.teacher) if batchnorm_guard else []

    def forward_backward(self, crops: list[torch.Tensor], teacher_temp: float,
                         accept: Callable[[torch.Tensor], bool] | None = None,
                         stage: Callable[[str], ContextManager] = no_stages) -> StepOutputs:
        """`crops`: the official list of 2 + n `[B, 3, H, W]` tensors, globals first.
        `accept(loss)` (optional) decides before anything lasting changes whether the step counts
        (the trainer's on_nonfinite_loss=skip); a dropped step restores batch norm statistics
        (with `batchnorm_guard`) and clears gradients. The centre update needs the loss to have
        been built with `defer_center_update=True` to be dropped too."""
        saved = [b.clone() for b in self._batchnorm_buffers]
        with self.autocast():
            with stage("teacher_forward"), torch.no_grad():
                teacher_output, teacher_features = self.teacher(crops[:2], return_backbone=True)
            with stage("student_forward"):
                student_output = self.runner(crops)
            with stage("loss"):
                loss = self.dino_loss(student_output, teacher_output, teacher_temp=teacher_temp)
        accepted = accept is None or accept(loss)
        if accepted:
            if self.dino_loss.defer_center_update:  # else the loss's forward has moved it already
                self.dino_loss.commit_center()
            with stage("backward"):
                self.runner.backward(loss)
        else:
            for buffer, before in zip(self._batchnorm_buffers, saved):
                buffer.copy_(before)
            self.runner.zero_grad()
        return StepOutputs(loss, student_output, teacher_output, teacher_features, accepted)

    def optimizer_step(self, stage: Callable[[str], ContextManager] = no_stages) -> None:
        with stage("optimizer"):
            self.runner.step()

    def update_teacher(self, momentum: float, stage: Callable[[str], ContextManager] = no_stages) -> None:
        with stage("ema"):
            ema_update_(self.teacher, self.student, momentum, impl=self.ema_impl)

    def train_step(self, crops: list[torch.Tensor], teacher_temp: float, momentum: float,
                   accept: Callable[[torch.Tensor], bool] | None = None,
                   stage: Callable[[str], ContextManager] = no_stages) -> StepOutputs:
        """forward_backward, then (if accepted) optimizer_step and update_teacher: a whole step."""
        outputs = self.forward_backward(crops, teacher_temp, accept, stage)
        if outputs.accepted:
            self.optimizer_step(stage)
            self.update_teacher(momentum, stage)
        return outputs
