"""Backbone weights in and out: the official DINO layout, timm's, safetensors and Hugging Face's.

Reading: `read_backbone` is the one reader every command uses (`eval knn|linear`, `viz
attention`, `export`, `fastdino.load_backbone`);
`read_weights` is its tensor half. It accepts, all through `torch.load(weights_only=True)` or
safetensors, never pickle:
  * fastdino training checkpoints (student/teacher `backbone.*` + `head.*`, config inside),
    as a step file, a DeepSpeed step folder, or a run folder (its newest checkpoint, logged);
  * official backbone-only files such as `dino_deitsmall16_pretrain.pth`;
  * official full training checkpoints `{"student": ..., "teacher": ..., ...}`, whose keys
    carry `module.` (DDP) and `backbone.` (MultiCropWrapper) prefixes, stripped as the
    official `utils.load_pretrained_weights` does (teacher by default);
  * timm-layout files (also wrapped in `{"state_dict": ...}` or `{"model": ...}`) and
    safetensors files, ours (architecture in the metadata) or anyone's;
  * Hugging Face ViT folders (`config.json` + `model.safetensors` or `pytorch_model.bin`, as
    `save_pretrained` and `export --format hf` write them, e.g. facebook/dino-vits16), and their
    weight files on their own: the Hub's `ViTModel` names (and transformers 5's module names, as
    in a 5.x `state_dict()`) become fastdino's, query, key and value joined into one qkv; a `vit.`
    prefix is stripped, `pooler.*` and `classifier.*` are dropped.
    A `config.json` asking for what fastdino's ViT does not compute (another activation, layer
    norm epsilon or MLP width, no qkv bias) is refused rather than loaded into a different network.
What a file does not record (official and timm files say nothing about the model) is read
off the tensor shapes, which fix a fastdino ViT exactly: the width names the architecture (and
so its head count), the patch embedding the patch size, the block indices the depth, the
position embedding the image size. Arguments given to the reader win over both.

Writing (`export_weights`). Each format has its extension, added to an output name that has
none; an extension of another format is an error (safetensors bytes in a `.pth` file would be
taken for a pickle). An existing folder given to a one-file format gets the file inside it,
named after what it holds (`output_path`). Every file is written to a temporary name and
renamed, so a crash never leaves half a file, with the permissions the umask gives
(safetensors' own writer makes 0600 files).
  * official (.pth): a plain `VisionTransformer.state_dict()`; with the head, `{which:
    {backbone.*, head.*}}` as the teacher entry of the official full checkpoints.
  * timm (.safetensors): timm's `VisionTransformer` kept DINO's backbone names key for key
    (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2,
    mlp.fc1, mlp.fc2}, norm), so the tensors are those of `official`. What is timm's is the
    container and what comes with it: a safetensors file, as timm's own Hub weights, which timm
    loads by its extension; never the DINO head (timm's `head.*` is a class-logit Linear); and
    metadata `timm_model` + `timm_model_args` (img_size, patch_size, embed_dim, depth, num_heads,
    num_classes=0) for `timm.create_model(timm_model, pretrained=True, pretrained_cfg_overlay=
    dict(file=OUT), **timm_model_args)`, which builds the exact shape (timm's registered names only
    cover patch 8/16 at 224 with 12 blocks).
  * safetensors (.safetensors): `safetensors.torch.save` of the backbone (with the head:
    `backbone.*` + `head.*`).
  * hf (a folder): `config.json` (every `ViTConfig` field, `layer_norm_eps=1e-6`, `qkv_bias=true`)
    + `model.safetensors` under the Hub's `ViTModel` names, the ones transformers 4.x uses and
    5.x still writes and maps on load, for `transformers.ViTModel.from_pretrained(OUT,
    add_pooling_layer=False)`. DINO has no pooler, so none is written: with the default
    `add_pooling_layer=True` transformers would initialise one at random.
Our safetensors files (all but official) carry arch, patch_size, embed_dim, depth, num_heads,
img_size, which network and the source step in their metadata, so they load back without being
told the architecture.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from fastdino import models
from fastdino.config import CHOICES
from fastdino.models.vit import VisionTransformer
from fastdino.train.checkpoint import (CHECKPOINT_VERSION, CheckpointError, atomic_torch_save, atomic_write_bytes,
                                       resolve_checkpoint, torch_load_safely)

EXPORT_FORMATS = ("official", "timm", "safetensors", "hf")
# The extensions each format's file may have, the first being the one added to a bare name; hf writes a folder.
FORMAT_SUFFIXES = {"official": (".pth", ".pt"), "timm": (".safetensors",), "safetensors": (".safetensors",), "hf": ()}
_WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}
SAFETENSORS_FORMAT_VERSION = "1"
ARCHS = CHOICES["model.arch"]
# The widths the architecture factories fix (models.vit_tiny, vit_small, vit_base).
ARCH_BY_WIDTH = {192: "vit_tiny", 384: "vit_small", 768: "vit_base"}
# What the official factories build when neither the file nor its tensors say (official weights are all 12 x 224).
OFFICIAL_DEPTH, OFFICIAL_IMG_SIZE = 12, 224
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class BackboneWeights:
    """Tensors read from a weights file, with what the file itself says about the model."""
    backbone: dict[str, torch.Tensor]  # VisionTransformer.state_dict() names
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # the DINO projection head, when the file has it
    arch: str | None = None
    patch_size: int | None = None
    depth: int | None = None
    img_size: int | None = None
    num_heads: int | None = None  # when the file records it (ours, Hugging Face's); else the arch's own
    eval_size: int | None = None  # the run's eval.eval_size (fastdino checkpoints only)
    step: int | None = None
    config: object | None = None  # the run's OmegaConf config (fastdino checkpoints only)
    source: Path | None = None  # the file read (a folder's newest checkpoint, a step folder's fastdino.pt)
    has_pair: bool = False  # the file holds a teacher and a student (training checkpoints), so `which` chose


def read_weights(path: str | Path, which: str = "teacher") -> BackboneWeights:
    """The `which` network's backbone (and DINO head) from any file or folder the module docstring
    lists, with what the file says about the model, completed from the tensor shapes.

    Raises CheckpointError (one line) for a missing, damaged or foreign file, a folder without
    a checkpoint, a Hugging Face config fastdino's ViT cannot compute, a file that pickles
    anything but tensors and plain values, or which="student" for a file that holds one network
    (exports and released weights: its weights would be reported as the student's).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():  # run folders hold config.yaml, never config.json
        weights = _read_hf_folder(path, which)
    else:
        path = resolve_checkpoint(path)
        weights = _read_weight_file(path, which)
    if which == "student" and not weights.has_pair:
        raise CheckpointError(f"{weights.source or path} holds one network's weights, not a teacher and a student: "
                              f"--which student needs a training checkpoint")
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


def _read_weight_file(path: Path, which: str) -> BackboneWeights:
    weights = _read_safetensors(path) if _is_safetensors(path) else _read_torch_file(path, which)
    weights.source = path
    return weights


def _read_torch_file(path: Path, which: str) -> BackboneWeights:
    state = torch_load_safely(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a dict of weights")
    if state.get("version") == CHECKPOINT_VERSION and "config" in state:  # a fastdino training checkpoint
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(state["config"])
        weights = _split_backbone_and_head(state[which], path)
        weights.has_pair = True
        weights.arch, weights.patch_size = cfg.model.arch, cfg.model.patch_size
        weights.depth, weights.img_size = cfg.model.depth, cfg.model.img_size
        weights.eval_size, weights.step, weights.config = cfg.eval.eval_size, int(state["step"]), cfg
        return weights
    if "teacher" in state or "student" in state:  # an official full training checkpoint
        if which not in state:
            raise CheckpointError(f"{path} has no {which!r} entry (it has {sorted(state)})")
        weights = _split_backbone_and_head(state[which], path)
        weights.has_pair = True
        return weights
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
    official 12 and 224 where neither says, the head count to the architecture's. Raises
    CheckpointError naming the first missing, unexpected and wrongly shaped keys when the
    weights do not fit.
    """
    arch, patch_size = arch or weights.arch, patch_size or weights.patch_size
    depth, img_size = depth or weights.depth or OFFICIAL_DEPTH, img_size or weights.img_size or OFFICIAL_IMG_SIZE
    if arch is None or patch_size is None:
        raise CheckpointError(f"{source} does not say which model it holds, and its tensors "
                              f"{_first_few(sorted(weights.backbone))} fit none of {', '.join(ARCHS)}: give the "
                              f"architecture (--arch {'|'.join(ARCHS)} --patch-size 8|16)")
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    heads = {"num_heads": weights.num_heads} if weights.num_heads else {}
    model = getattr(models, arch)(patch_size=patch_size, img_size=[img_size], depth=depth, **heads)
    if model.embed_dim % model.num_heads:
        raise CheckpointError(f"{source} asks for {model.num_heads} attention heads, which do not divide "
                              f"{arch}'s width {model.embed_dim}")
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


def output_path(out: str | Path, fmt: str, which: str = "teacher", with_head: bool = False) -> Path:
    """Where `export_weights` writes `fmt`. When `out` is an existing folder and the format writes
    one file: inside it, as WHICH_backbone.pth (official), WHICH_backbone_timm.safetensors (timm)
    or WHICH_backbone.safetensors (safetensors), `_with_head` before the extension when the file
    holds the DINO head. Else `out`, with the format's extension added when its name has none (hf:
    a folder, as named). Raises CheckpointError when `out` has the extension of another kind of
    weights file."""
    out = Path(out)
    suffix, allowed = out.suffix.lower(), FORMAT_SUFFIXES[fmt]
    if allowed and out.is_dir():  # whoever names a folder means to write into it, not beside it
        # timm and safetensors share an extension: the layout in the name keeps both in one folder.
        layout = "_timm" if fmt == "timm" else ""
        return out / f"{which}_backbone{layout}{'_with_head' if with_head else ''}{allowed[0]}"
    if suffix in _WEIGHT_SUFFIXES and suffix not in allowed:
        kind = "a folder (config.json + model.safetensors)" if fmt == "hf" else f"a {allowed[0]} file"
        fixed = out.with_suffix(allowed[0] if allowed else "")
        raise CheckpointError(f"output {out}: --format {fmt} writes {kind}, not a {suffix} file; name it {fixed}")
    return out.with_name(out.name + allowed[0]) if allowed and not suffix else out


def export_weights(path: str | Path, out: str | Path, fmt: str, which: str = "teacher", with_head: bool = False,
                   arch: str | None = None, patch_size: int | None = None) -> dict:
    """Writes `which`'s backbone of `path` (anything `read_backbone` reads) in format `fmt` to
    `output_path(out, fmt, which, with_head)`; returns a summary of what it wrote (`out`: the path written) and
    the file it read (`source`). Raises CheckpointError (a file that cannot be read, a head asked
    for where the format has no place for it, an output name of another format, an hf folder
    that would overwrite something else)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    if with_head and fmt in ("timm", "hf"):
        raise CheckpointError(f"{fmt} has no place for the DINO projection head: export {fmt} without --with-head")
    out = output_path(out, fmt, which, with_head)
    # Building the model checks that the tensors fit the architecture written into the metadata.
    backbone, weights = read_backbone(path, which, arch, patch_size)
    if with_head and not weights.head:
        raise CheckpointError(f"{path} has no DINO head to export (it holds a backbone only)")
    arch = arch or weights.arch
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    head = {k: v.contiguous() for k, v in weights.head.items()} if with_head else {}
    metadata = _architecture_metadata(backbone, arch, which, weights.step, fmt)
    if fmt == "official":
        wrapped = {which: {**_prefixed(state, "backbone."), **_prefixed(head, "head.")}}
        atomic_torch_save(wrapped if head else state, out)
    elif fmt == "safetensors":
        tensors = {**_prefixed(state, "backbone."), **_prefixed(head, "head.")} if head else state
        _atomic_write(out, safetensors_bytes(tensors, {"format": "fastdino-backbone", **metadata}))
    elif fmt == "timm":
        timm_args = {"img_size": backbone.patch_embed.img_size, "patch_size": backbone.patch_embed.patch_size,
                     "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "num_heads": backbone.num_heads,
                     "num_classes": 0}
        # "pt" as timm's (and transformers') own safetensors files say; the registered name is one per
        # width, its arguments override every shape.
        _atomic_write(out, safetensors_bytes(state, {"format": "pt", **metadata, "timm_model": f"{arch}_patch16_224",
                                                     "timm_model_args": json.dumps(timm_args)}))
    else:
        config = json.dumps(_hf_config(backbone), indent=2, sort_keys=True) + "\n"
        _atomic_write_hf_folder(out, {"config.json": config.encode(),
                                      "model.safetensors": safetensors_bytes(_to_hf_names(state),
                                                                             {"format": "pt", **metadata})})
    return {"out": str(out), "format": fmt, "which": which, "arch": arch,
            "patch_size": backbone.patch_embed.patch_size, "tensors": len(state) + len(head),
            "with_head": bool(head), "source_step": weights.step, "source": str(weights.source)}


def _architecture_metadata(backbone: VisionTransformer, arch: str, which: str, step: int | None, fmt: str) -> dict:
    """What our safetensors files say about their model (safetensors metadata values are strings)."""
    metadata = {"format_version": SAFETENSORS_FORMAT_VERSION, "fastdino_layout": fmt, "arch": arch,
                "patch_size": str(backbone.patch_embed.patch_size), "embed_dim": str(backbone.embed_dim),
                "depth": str(len(backbone.blocks)), "num_heads": str(backbone.num_heads),
                "img_size": str(backbone.patch_embed.img_size), "which": which}
    if step is not None:
        metadata["source_step"] = str(step)
    return metadata


def _split_backbone_and_head(state: dict, path: Path) -> BackboneWeights:
    """Strips `module.` and `backbone.` prefixes; `head.*` is the DINO head when the keys came
    wrapped in `backbone.` (a MultiCropWrapper), otherwise a classifier (timm), dropped. Hugging
    Face names become fastdino's."""
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if not state:
        raise CheckpointError(f"{path} holds no tensors")
    state = {_current_key(k.removeprefix("module.")): v for k, v in state.items()}
    if any(k.removeprefix("vit.") == _HF_PATCH_KEY for k in state):
        return BackboneWeights(backbone=_from_hf_names(state))
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


# ---------------------------------------------------------------- Hugging Face ViT

# fastdino (= official DINO = timm) names -> the Hub's ViTModel names. transformers 5 renamed the modules
# (layers.N.attention.q_proj, ...) yet writes and reads these, which 4.x needs.
_HF_NAMES = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
             "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_HF_BLOCK_NAMES = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
                   "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
# fastdino's qkv Linear [3 * width, width] is HF's query, key and value Linears stacked in this order.
_HF_QKV = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
_HF_PATCH_KEY = _HF_NAMES["patch_embed.proj.weight"]
_HF_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
# transformers 5 module names (what a 5.x `model.state_dict()` holds) -> the Hub's names above.
_HF5_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF5_NAMES = {"attention.q_proj": _HF_QKV[0], "attention.k_proj": _HF_QKV[1], "attention.v_proj": _HF_QKV[2],
              "attention.o_proj": "attention.output.dense", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_FROM_HF_NAMES = {hf: ours for ours, hf in _HF_NAMES.items()}
_FROM_HF_BLOCK_NAMES = {hf: ours for ours, hf in _HF_BLOCK_NAMES.items()}
# ViTConfig's defaults (transformers' configuration_vit.py), for fields a config.json leaves out.
_HF_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
                "num_channels": 3, "qkv_bias": True}


def _to_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hf = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            hf[_HF_NAMES[key]] = tensor
            continue
        module, param = key[match.end():].rsplit(".", 1)
        layer = f"encoder.layer.{match.group(1)}."
        if module == "attn.qkv":
            for name, part in zip(_HF_QKV, tensor.chunk(3)):
                hf[f"{layer}{name}.{param}"] = part.contiguous()
        else:
            hf[f"{layer}{_HF_BLOCK_NAMES[module]}.{param}"] = tensor
    return hf


def _from_hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub ViTModel names -> fastdino's. Names it does not know are kept as they are, so that the
    build reports them as unexpected keys."""
    state = {_hub_name(k.removeprefix("vit.")): v for k, v in state.items()}
    ours, qkv = {}, {}
    for key, tensor in state.items():
        if key.startswith(("pooler.", "classifier.")):  # not part of DINO's backbone
            continue
        match = _HF_LAYER_KEY.match(key)
        if key in _FROM_HF_NAMES:
            ours[_FROM_HF_NAMES[key]] = tensor
        elif match and match.group(2) in _FROM_HF_BLOCK_NAMES:
            ours[f"blocks.{match.group(1)}.{_FROM_HF_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"] = tensor
        elif match and match.group(2) in _HF_QKV:
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)] = tensor
        else:
            ours[key] = tensor
    for (layer, param), parts in qkv.items():
        if len(parts) == len(_HF_QKV):
            ours[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts[name] for name in _HF_QKV])
        else:
            ours.update({f"encoder.layer.{layer}.{name}.{param}": t for name, t in parts.items()})
    return ours


def _hub_name(key: str) -> str:
    match = _HF5_LAYER_KEY.match(key)
    if match is None:
        return key
    layer, module, param = match.groups()
    return f"encoder.layer.{layer}.{_HF5_NAMES.get(module, module)}.{param}"


def _hf_config(backbone: VisionTransformer) -> dict:
    """Every field `ViTConfig.save_pretrained` writes (but transformers_version), for this backbone."""
    width, patch = backbone.embed_dim, backbone.patch_embed.patch_size
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": width,
            "num_hidden_layers": len(backbone.blocks), "num_attention_heads": backbone.num_heads,
            "intermediate_size": backbone.blocks[0].mlp.fc1.out_features, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
            "layer_norm_eps": backbone.norm.eps, "image_size": backbone.patch_embed.img_size, "patch_size": patch,
            "num_channels": backbone.patch_embed.proj.in_channels,
            "qkv_bias": backbone.blocks[0].attn.qkv.bias is not None, "encoder_stride": patch,
            "pooler_output_size": width, "pooler_act": "tanh", "dtype": "float32"}


def _read_hf_folder(folder: Path, which: str) -> BackboneWeights:
    try:
        config = {**_HF_DEFAULTS, **json.loads((folder / "config.json").read_text())}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {_first_line(exc)}") from None
    if config.get("model_type") != "vit":
        raise CheckpointError(f"{folder} holds a Hugging Face {config.get('model_type')!r} model; fastdino reads "
                              f"ViT folders (model_type 'vit')")
    width = config["hidden_size"]
    computes = {"hidden_act": "gelu", "qkv_bias": True, "layer_norm_eps": 1e-6, "num_channels": 3,
                "intermediate_size": 4 * width}
    for key, value in computes.items():
        close = isinstance(value, float) and isinstance(config[key], (int, float)) and math.isclose(config[key], value)
        if config[key] != value and not close:
            raise CheckpointError(f"{folder}/config.json: {key} is {config[key]!r}, and fastdino's ViT computes "
                                  f"with {value!r}")
    found = [folder / name for name in HF_WEIGHT_FILES if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"{folder} has a config.json but none of {', '.join(HF_WEIGHT_FILES)}")
    weights = _read_weight_file(found[0], which)
    image_size, patch_size = (_square(config[key], folder, key) for key in ("image_size", "patch_size"))
    weights.arch, weights.patch_size, weights.img_size = ARCH_BY_WIDTH.get(width), patch_size, image_size
    weights.depth, weights.num_heads = config["num_hidden_layers"], config["num_attention_heads"]
    return weights


def _square(value, folder: Path, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{folder}/config.json: {key} is {value}; fastdino's ViT is square")
        value = value[0]
    return int(value)


# ---------------------------------------------------------------- files

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
    # Ours: the safetensors format says so in `format` (as since its first version), the others in fastdino_layout.
    if metadata.get("format") == "fastdino-backbone" or "fastdino_layout" in metadata:
        weights.arch = metadata["arch"]
        weights.patch_size, weights.depth = int(metadata["patch_size"]), int(metadata["depth"])
        weights.img_size = int(metadata["img_size"])
        weights.num_heads = int(metadata["num_heads"]) if "num_heads" in metadata else None
        weights.step = int(metadata["source_step"]) if "source_step" in metadata else None
    return weights


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _atomic_write_hf_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Writes `files` into a temporary folder, then renames it to `folder`, replacing an earlier
    export there; any other existing file or folder is left alone (CheckpointError)."""
    if folder.is_file() or (folder.is_dir() and not {p.name for p in folder.iterdir()} <= set(files)):
        raise CheckpointError(f"output {folder} exists and is not an hf export: give a new folder name")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        if folder.exists():
            os.replace(folder, trash)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(trash, ignore_errors=True)


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _first_few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{f', ... {len(keys) - n} more' if len(keys) > n else ''}]"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
