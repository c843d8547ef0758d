"""The Python API: train, read a backbone, embed images. `import fastdino` exposes these three
lazily (see fastdino/__init__.py); each is what a `fastdino` command does, for use in a notebook.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from fastdino.models.vit import VisionTransformer


def train(config: str | os.PathLike | Mapping | None = None, /, *, resume: str | None = None,
          overwrite: bool = False, **overrides) -> dict:
    """Trains DINO as `fastdino train` does, in this process; returns the run's summary.

    `config` is an experiment YAML file, the name of a shipped one (`"demo"`, `"vit_small_16"`,
    ...: see `fastdino.config.CONFIG_DIR`), a mapping of config keys, or None for the defaults.
    `overrides` go on top, as config keys: nested sections as dicts (`data={"path": "synthetic"}`)
    or dotted names (`**{"data.path": "synthetic"}`); both are `key=value` on the command line.
    `resume` and `overwrite` are the command's `--resume CHECKPOINT|auto` and `--overwrite`.

    Returns the trainer's summary (`steps`, `last`: the last log.jsonl record, `knn`, `final_knn`,
    `collapse_warnings`, `memory`, `skipped_steps`) with `output_dir` added. Raises
    fastdino.config.ConfigError for an unknown key or a bad value (one line, naming the key),
    and what the command's errors are otherwise; KeyboardInterrupt when stopped by SIGINT/SIGTERM.
    """
    from fastdino.parallel import shutdown_distributed
    from fastdino.train.run_folder import launch_config
    from fastdino.train.trainer import Trainer

    items = []
    if isinstance(config, Mapping):
        items, config = _override_items(config), None
    items += _override_items(overrides)
    cfg = launch_config(None if config is None else os.fspath(config), items, resume)
    try:
        summary = Trainer(cfg, resume=resume, overwrite=overwrite).train()
    finally:
        shutdown_distributed()
    return {"output_dir": cfg.output_dir, **summary}


def _override_items(tree: Mapping, prefix: str = "") -> list[str]:
    """`key=value` strings of a (nested) mapping. Values are written as JSON, which YAML reads back
    as the same value: a string stays a string whatever it holds (`"1e-3"`, `"a: b"`, `"null"`)."""
    items = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items += _override_items(value, dotted + ".")
        else:
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            items.append(f"{dotted}={json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return items


def load_backbone(path: str | os.PathLike, which: str = "teacher", *, arch: str | None = None,
                  patch_size: int | None = None, device: str | torch.device = "cpu") -> VisionTransformer:
    """The `which` network's ViT backbone, in eval mode on `device`, from any checkpoint kind a
    `fastdino` command reads: a training checkpoint (step file, DeepSpeed step folder, or a run
    folder: its newest checkpoint), official DINO weights, every `fastdino export` format (a
    Hugging Face folder included) and timm-layout or safetensors files. The architecture comes
    from the file or its tensor shapes; `arch` and `patch_size` win over both.

    The model is `fastdino.models.VisionTransformer`: `model(x)` gives the CLS embedding `[B, D]`
    for images `[B, 3, H, W]` (H and W multiples of the patch size; position embeddings are
    interpolated for other sizes, as the official DINO). Raises
    fastdino.train.checkpoint.CheckpointError (one line) when the file cannot be read or does not
    fit a ViT. `fastdino.eval.export.read_backbone` also returns what the file said (step, config).
    """
    from fastdino.eval.export import read_backbone

    return read_backbone(path, which, arch, patch_size)[0].to(device)


@torch.no_grad()
def extract_features(backbone: nn.Module, images, *, batch_size: int = 64, patch_tokens: bool = True,
                     device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """CLS and patch tokens of `backbone` (a fastdino/official VisionTransformer) after its final
    norm, in eval mode (restored afterwards), without gradients.

    `images` is a float tensor `[N, 3, H, W]` normalised as for training (ImageNet mean and std),
    a uint8 tensor `[N, 3, H, W]` (scaled to [0, 1] and normalised here), or an iterable of such
    batches or of `(images, labels)` pairs, as `fastdino.data.eval_loader` yields them. A tensor is
    cut into batches of `batch_size`. It runs on `device` (default: the backbone's).

    Returns fp32 CPU tensors: `cls` `[N, D]`; `patch` `[N, (H/p) * (W/p), D]` in row-major patch
    order (p the patch size; left out with `patch_tokens=False`); `labels` `[N]` when the batches
    carry labels. Features are not L2-normalised (k-NN normalises them; see
    `fastdino.eval.knn`). Raises ValueError for images of another shape than `[B, 3, H, W]`, H or
    W not a multiple of p, or patch tokens of batches of different sizes (they cannot be stacked).
    """
    from fastdino.eval.knn import eval_mode

    if isinstance(images, torch.Tensor):
        images = images.split(batch_size)
    parameter = next(backbone.parameters())
    device = parameter.device if device is None else torch.device(device)
    patch = backbone.patch_embed.patch_size
    cls, patches, labels = [], [], []
    with eval_mode(backbone):
        for batch in images:
            batch_labels = None
            if isinstance(batch, (tuple, list)):
                batch, batch_labels = batch[0], batch[1]
            batch = _as_model_input(torch.as_tensor(batch), patch).to(device, parameter.dtype, non_blocking=True)
            tokens = backbone.forward_features(batch).float().cpu()
            cls.append(tokens[:, 0])
            if patch_tokens:
                patches.append(tokens[:, 1:])
            if batch_labels is not None:
                labels.append(torch.as_tensor(batch_labels).cpu())
    if not cls:
        raise ValueError("extract_features got no images")
    features = {"cls": torch.cat(cls)}
    if patch_tokens:
        if len({p.shape[1] for p in patches}) > 1:
            raise ValueError(f"batches of different image sizes give different numbers of patch tokens "
                             f"({sorted({p.shape[1] for p in patches})}): embed each size on its own, or pass "
                             f"patch_tokens=False")
        features["patch"] = torch.cat(patches)
    if labels:
        features["labels"] = torch.cat(labels)
    return features


def _as_model_input(batch: torch.Tensor, patch: int) -> torch.Tensor:
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(batch.shape)}")
    if batch.shape[2] % patch or batch.shape[3] % patch:
        raise ValueError(f"image size {batch.shape[2]}x{batch.shape[3]} is not a multiple of the patch size {patch}")
    if batch.dtype == torch.uint8:
        from fastdino.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        batch = (batch.float() / 255 - mean) / std
    return batch
