"""Student and teacher networks, and the optimizer parameter groups.

The backbone (fastdino.models) knows nothing of DINO: this module wraps it with a
DINOHead, runs multi-crop lists through it, builds the EMA teacher and decides
which parameters get weight decay.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from fastdino import models


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

    Speed options come from the model config, in a fixed order: packed multi-crop forward
    (`packed_crops`), then activation checkpointing of the student's blocks
    (`activation_checkpointing`), then torch.compile of every block (`compile`). Neither
    changes parameter names or state_dict keys (the official checkpoint contract), so a
    wrapper applied afterwards (DeepSpeed) and the EMA see the plain model.
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
    student.backbone.set_activation_checkpointing(model_cfg.activation_checkpointing)
    if model_cfg.compile:
        for net in (student, teacher):
            compile_blocks(net.backbone)
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
