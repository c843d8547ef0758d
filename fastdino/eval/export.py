"""Backbone weights in and out: the official DINO layout, timm's, and safetensors.

Reading: `read_backbone` is the one reader every command uses (`eval knn|linear`, `viz
attention`, `export`, `fastdino.train.checkpoint.load_backbone`); `read_weights` is its
tensor half. It accepts, all through `torch.load(weights_only=True)` or safetensors, never
pickle:
  * fastdino training checkpoints (student/teacher `backbone.*` + `head.*`, config inside),
    as a step file, a DeepSpeed step folder, or a run folder (its newest checkpoint, logged);
  * official backbone-only files such as `dino_deitsmall16_pretrain.pth`;
  * official full training checkpoints `{"student": ..., "teacher": ..., ...}`, whose keys
    carry `module.` (DDP) and `backbone.` (MultiCropWrapper) prefixes, stripped as the
    official `utils.load_pretrained_weights` does (teacher by default);
  * timm-layout files (also wrapped in `{"state_dict": ...}` or `{"model": ...}`) and
    safetensors files, ours (architecture in the metadata) or anyone's.
What a file does not record (official and timm files say nothing about the model) is read
off the tensor shapes, which fix a fastdino ViT exactly: the width names the architecture,
the patch embedding the patch size, the block indices the depth, the position embedding
the image size. Arguments given to the reader win over both.

Writing (`export_weights`):
  * official: a plain `VisionTransformer.state_dict()`; with the head, `{which: {backbone.*,
    head.*}}` as the teacher entry of the official full checkpoints.
  * timm: the same tensors under the same names. timm's `VisionTransformer` and DINO's share
    their backbone naming key for key (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,
    attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), so the file loads with
    `timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True,
    pretrained_cfg_overlay=dict(file=OUT))`. The differences are elsewhere: timm's `head.*`
    is a class-logit Linear (1000 ImageNet classes by default; build with num_classes=0 to
    have none), while DINO's `head.*` is the projection head of the MultiCropWrapper, which
    has no timm counterpart and is refused here; timm fixes the input size to `img_size`
    (pos_embed has 1 + (img_size/patch)^2 rows) unless built with `dynamic_img_size=True`,
    while DINO interpolates the position embedding for any input size; and timm's registered
    names only cover the official shapes (patch 8/16 at 224), other shapes need timm's
    `VisionTransformer(img_size=..., patch_size=..., embed_dim=..., depth=..., num_heads=...)`.
  * safetensors: `safetensors.torch.save_file` of the backbone (with the head: `backbone.*` +
    `head.*`), metadata arch, patch_size, embed_dim, depth, img_size, format version and the
    source step, so it loads back without being told the architecture.

Every file is written to a temporary name and renamed, so a crash never leaves half a file.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastdino import models
from fastdino.config import CHOICES
from fastdino.models.vit import VisionTransformer
from fastdino.train.checkpoint import (CHECKPOINT_VERSION, CheckpointError, atomic_torch_save, resolve_checkpoint,
                                       torch_load_safely)

EXPORT_FORMATS = ("official", "timm", "safetensors")
SAFETENSORS_FORMAT_VERSION = "1"
ARCHS = CHOICES["model.arch"]
# The widths the architecture factories fix (models.vit_tiny, vit_small, vit_base).
ARCH_BY_WIDTH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
# What the official factories build when neither the file nor its tensors say (official weights are all 12 x 224).
OFFICIAL_DEPTH, OFFICIAL_IMG_SIZE = 12, 224


@dataclass
class BackboneWeights:
    """Tensors read from a weights file, with what the file itself says about the model."""
    backbone: dict[str, torch.Tensor]  # VisionTransformer.state_dict() names
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # the DINO projection head, when the file has it
    arch: str | None = None
    patch_size: int | None = None
    depth: int | None = None
    img_size: int | None = None
    eval_size: int | None = None  # the run's eval.eval_size (fastdino checkpoints only)
    step: int | None = None
    config: object | None = None  # the run's OmegaConf config (fastdino checkpoints only)
    source: Path | None = None  # the file read (a folder's newest checkpoint, a step folder's fastdino.pt)


def read_weights(path: str | Path, which: str = "teacher") -> BackboneWeights:
    """The `which` network's backbone (and DINO head) from any file or folder the module docstring
    lists, with what the file says about the model, completed from the tensor shapes.

    Raises CheckpointError (one line) for a missing, damaged or foreign file, a folder without
    a checkpoint, or a file that pickles anything but tensors and plain values.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = resolve_checkpoint(path)
    weights = _read_safetensors(path) if _is_safetensors(path) else _read_torch_file(path, which)
    weights.source = path
    _complete_from_shapes(weights)
    return weights


def read_backbone(path: str | Path, which: str = "teacher", arch: str | None = None, patch_size: int | None = None,
                  depth: int | None = None, img_size: int | None = None
                  ) -> tuple[VisionTransformer, BackboneWeights]:
    """(backbone in eval mode on the CPU, the weights read) from any file or folder the module
    docstring lists; arguments given here win over what the file says. Raises CheckpointError
    as `read_weights` and `build_backbone_for` do."""
    weights = read_weights(path, which)
    return build_backbone_for(weights, path, arch, patch_size, depth, img_size), weights


def _read_torch_file(path: Path, which: str) -> BackboneWeights:
    state = torch_load_safely(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of weights")
    if state.get("version") == CHECKPOINT_VERSION and "config" in state:  # a fastdino training checkpoint
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(state["config"])
        weights = _split_backbone_and_head(state[which], path)
        weights.arch, weights.patch_size = cfg.model.arch, cfg.model.patch_size
        weights.depth, weights.img_size = cfg.model.depth, cfg.model.img_size
        weights.eval_size, weights.step, weights.config = cfg.eval.eval_size, int(state["step"]), cfg
        return weights
    if "teacher" in state or "student" in state:  # an official full training checkpoint
        if which not in state:
            raise CheckpointError(f"{path} has no {which!r} entry (it has {sorted(state)})")
        return _split_backbone_and_head(state[which], path)
    for wrapper in ("state_dict", "model"):  # timm / DeiT training checkpoints
        if isinstance(state.get(wrapper), dict):
            return _split_backbone_and_head(state[wrapper], path)
    return _split_backbone_and_head(state, path)


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def _complete_from_shapes(weights: BackboneWeights) -> None:
    """Fills what the file left unsaid from the tensors (see the module docstring); a ViT part
    that is missing leaves its field empty, and the build then names the missing keys."""
    tensors = weights.backbone
    projection = tensors.get("patch_embed.proj.weight")  # [width, 3, patch, patch]
    if projection is not None and projection.ndim == 4:
        weights.arch = weights.arch or ARCH_BY_WIDTH.get(projection.shape[0])
        weights.patch_size = weights.patch_size or projection.shape[-1]
    blocks = [int(match.group(1)) for match in map(_BLOCK_KEY.match, tensors) if match]
    if blocks and weights.depth is None:
        weights.depth = max(blocks) + 1
    positions = tensors.get("pos_embed")  # [1, 1 + (img_size / patch)^2, width]
    if positions is not None and positions.ndim == 3 and weights.patch_size and weights.img_size is None:
        side = math.isqrt(positions.shape[1] - 1)
        if side * side == positions.shape[1] - 1:
            weights.img_size = side * weights.patch_size


def build_backbone_for(weights: BackboneWeights, source: str | Path, arch: str | None = None,
                       patch_size: int | None = None, depth: int | None = None,
                       img_size: int | None = None) -> VisionTransformer:
    """A VisionTransformer holding `weights`, in eval mode.

    Arguments given here win over what the file says; depth and img_size default to the
    official 12 and 224 where neither says. Raises CheckpointError naming the first missing,
    unexpected and wrongly shaped keys when the weights do not fit.
    """
    arch, patch_size = arch or weights.arch, patch_size or weights.patch_size
    depth, img_size = depth or weights.depth or OFFICIAL_DEPTH, img_size or weights.img_size or OFFICIAL_IMG_SIZE
    if arch is None or patch_size is None:
        raise CheckpointError(f"{source} does not say which model it holds, and its tensors "
                              f"{_first_few(sorted(weights.backbone))} fit none of {', '.join(ARCHS)}: give the "
                              f"architecture (--arch {'|'.join(ARCHS)} --patch-size 8|16)")
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    model = getattr(models, arch)(patch_size=patch_size, img_size=[img_size], depth=depth)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights.backbone))
    unexpected = sorted(set(weights.backbone) - set(expected))
    wrong_shape = sorted(f"{key} {tuple(weights.backbone[key].shape)} vs {tuple(expected[key].shape)}"
                         for key in set(expected) & set(weights.backbone)
                         if weights.backbone[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        problems = [f"{name} {_first_few(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)) if keys]
        raise CheckpointError(f"{source} does not fit {arch} patch {patch_size} depth {depth} img_size {img_size}: "
                              + "; ".join(problems))
    model.load_state_dict(weights.backbone)
    return model.eval()


def load_pretrained_backbone(path: str | Path, arch: str | None = None, patch_size: int | None = None, *,
                             which: str = "teacher", depth: int | None = None,
                             img_size: int | None = None) -> VisionTransformer:
    """The backbone of `read_backbone`, without the weights it came from."""
    return read_backbone(path, which, arch, patch_size, depth, img_size)[0]


def export_weights(path: str | Path, out: str | Path, fmt: str, which: str = "teacher", with_head: bool = False,
                   arch: str | None = None, patch_size: int | None = None) -> dict:
    """Writes `which`'s backbone of `path` (anything `read_backbone` reads) to `out` in format `fmt`;
    returns a summary of what it wrote and the file it read (`source`). Raises CheckpointError."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if with_head and fmt == "timm":
        raise CheckpointError("timm has no place for the DINO projection head: export timm without --with-head")
    # Building the model checks that the tensors fit the architecture written into the metadata.
    backbone, weights = read_backbone(path, which, arch, patch_size)
    if with_head and not weights.head:
        raise CheckpointError(f"{path} has no DINO head to export (it holds a backbone only)")
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    head = {k: v.contiguous() for k, v in weights.head.items()} if with_head else {}
    if fmt == "official" and with_head:
        atomic_torch_save({which: {**_prefixed(state, "backbone."), **_prefixed(head, "head.")}}, out)
    elif fmt in ("official", "timm"):
        atomic_torch_save(state, out)
    else:
        tensors = {**_prefixed(state, "backbone."), **_prefixed(head, "head.")} if with_head else state
        metadata = {"format": "fastdino-backbone", "format_version": SAFETENSORS_FORMAT_VERSION,
                    "arch": arch or weights.arch, "patch_size": str(backbone.patch_embed.patch_size),
                    "embed_dim": str(backbone.embed_dim), "depth": str(len(backbone.blocks)),
                    "img_size": str(backbone.patch_embed.img_size), "which": which}
        if weights.step is not None:
            metadata["source_step"] = str(weights.step)
        _atomic_save_safetensors(tensors, metadata, Path(out))
    return {"out": str(out), "format": fmt, "which": which, "arch": arch or weights.arch,
            "patch_size": backbone.patch_embed.patch_size, "tensors": len(state) + len(head),
            "with_head": bool(head), "source_step": weights.step, "source": str(weights.source)}


def _split_backbone_and_head(state: dict, path: Path) -> BackboneWeights:
    """Strips `module.` and `backbone.` prefixes; `head.*` is the DINO head when the keys came
    wrapped in `backbone.` (a MultiCropWrapper), otherwise a classifier (timm), dropped."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    state = {_current_key(k.removeprefix("module.")): v for k, v in state.items()}
    wrapped = any(k.startswith("backbone.") for k in state)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if not k.startswith("head.")}
    head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")} if wrapped else {}
    return BackboneWeights(backbone=backbone, head=head)


# Heads saved by newer torch weight-norm parametrizations name the gain and direction differently.
_RENAMED = {"last_layer.parametrizations.weight.original0": "last_layer.weight_g",
            "last_layer.parametrizations.weight.original1": "last_layer.weight_v"}


def _current_key(key: str) -> str:
    for old, new in _RENAMED.items():
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with an 8-byte header length, then the JSON header's "{".
    with open(path, "rb") as f:
        start = f.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def _read_safetensors(path: Path) -> BackboneWeights:
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: corrupted safetensors file ({_first_line(exc)})") from None
    weights = _split_backbone_and_head(state, path)
    if metadata.get("format") == "fastdino-backbone":
        weights.arch = metadata["arch"]
        weights.patch_size, weights.depth = int(metadata["patch_size"]), int(metadata["depth"])
        weights.img_size = int(metadata["img_size"])
        weights.step = int(metadata["source_step"]) if "source_step" in metadata else None
    return weights


def _atomic_save_safetensors(tensors: dict, metadata: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _first_few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{f', ... {len(keys) - n} more' if len(keys) > n else ''}]"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
