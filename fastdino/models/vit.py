"""Vision Transformer backbone, parameter-for-parameter the official DINO one.

Module names, parameter shapes and initialisation follow facebookresearch/dino
`vision_transformer.py`, so its checkpoints load with strict=True and outputs match.
What differs is inside:
- attention goes through `fastdino.models.attention` (xformers / sdpa / math);
- `forward_packed` runs batches of different resolutions as ONE token sequence (patch
  embedding per resolution, then every norm, projection and MLP once over all tokens;
  attention block-diagonal per image), as DINOv2 does for multi-crop;
- stochastic depth can compute a residual branch only for the samples it keeps
  (`drop_path_impl="subset"`, DINOv2's trick) instead of computing it for every sample
  and zeroing some (`"per_sample"`, the official way, kept as the reference twin);
- the class-token readout (`forward`, `forward_packed`) computes the last block at the class
  tokens only: queries, output projection and MLP for one token per image, keys and values for
  all (the other tokens' outputs are never read): about 7 % of a 12-block ViT-S/16's FLOPs per crop;
- optional activation checkpointing per block (`set_activation_checkpointing`), which
  adds no module and so leaves the state_dict keys alone.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastdino.models.attention import (BACKENDS, PackedSequences, attention, attention_weights,
                                       packed_attention_rows, packed_class_token_attention, packed_linear)

DROP_PATH_IMPLS = ("subset", "per_sample")


def drop_path(x: torch.Tensor, drop_prob: float, training: bool, pack: PackedSequences | None = None) -> torch.Tensor:
    """Stochastic depth: zero the whole residual branch of a sample with probability
    `drop_prob`, scaling survivors by 1/keep_prob so the expectation is unchanged.
    With `pack`, x is `[1, T, D]` and a sample is one packed sequence."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    if pack is None:
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    else:
        keep = torch.cat([x.new_empty(count, 1).bernoulli_(keep_prob).expand(count, length).reshape(-1)
                          for count, length in pack.groups]).view(1, -1, 1)
    return x * keep / keep_prob


# A host-side draw: a compiled block breaks its graph here on purpose (and says nothing).
@torch.compiler.disable
def kept_sample_count(count: int, drop_prob: float) -> int:
    """How many of `count` samples keep their residual branch: (1 - p) * count rounded
    stochastically (so the expected share kept is exactly 1 - p even for small batches), at least 1."""
    expected = (1.0 - drop_prob) * count
    kept = math.floor(expected + torch.rand(()).item())  # CPU generator: no device sync
    return min(count, max(1, kept))


def drop_add_residual_subset(x: torch.Tensor, branch: Callable, drop_prob: float,
                             pack: PackedSequences | None = None, *, into: torch.Tensor | None = None) -> torch.Tensor:
    """x + stochastic-depth(branch(x)), computing the branch only for the samples kept.

    Per group of samples (the batch, or each group of a pack) a random subset of
    `kept_sample_count` samples runs the branch; its output is added back scaled by
    count / kept. Each sample is kept with probability kept / count, so the result equals
    x + branch(x) in expectation, like per-sample drop path, at (1 - p) of the cost.
    `branch(subset, subset_pack)` maps its input to a residual of the same shape, or with
    `into` (x's class tokens, `[B, 1, D]`, or `[1, num_sequences, D]` for a pack) to the class
    tokens' residual, which is added to `into` instead: the same draws, so the same samples kept.
    """
    target = x if into is None else into
    if pack is None:
        count = x.shape[0]
        kept = kept_sample_count(count, drop_prob)
        chosen = torch.randperm(count, device=x.device)[:kept]
        # index_select, not x[chosen]: its backward is an index_add, much faster than index_put's.
        residual = branch(x.index_select(0, chosen), None)
        return torch.index_add(target, 0, chosen, residual.to(target.dtype), alpha=count / kept)
    tokens = x.squeeze(0)  # not x[0]: select's backward writes a zero-filled full-size gradient
    target = target.squeeze(0)
    rows, target_rows, sub_groups, scales, sequence = [], [], [], [], 0
    for (count, length), start in zip(pack.groups, pack.group_starts()):
        kept = kept_sample_count(count, drop_prob)
        chosen = torch.randperm(count, device=x.device)[:kept]
        rows.append((start + chosen[:, None] * length + torch.arange(length, device=x.device)).flatten())
        target_rows.append(rows[-1] if into is None else sequence + chosen)
        sub_groups.append((kept, length))
        scales.append(count / kept)
        sequence += count
    index = torch.cat(rows)
    residual = branch(tokens.index_select(0, index).unsqueeze(0), PackedSequences(tuple(sub_groups)))
    residual = residual.squeeze(0).to(target.dtype)
    out, offset = target, 0
    for rows_of_group, scale in zip(target_rows, scales):
        n = rows_of_group.shape[0]
        # The first add is out of place (x stays intact for autograd), later ones add into its result.
        add = torch.index_add if out is target else torch.Tensor.index_add_
        out = add(out, 0, rows_of_group, residual[offset:offset + n], alpha=scale)
        offset += n
    return out.unsqueeze(0)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, pack: PackedSequences | None = None) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, pack)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, qk_scale: float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias=None, return_weights: bool = False):
        """`[B, N, C]` -> `[B, N, C]`; with `return_weights`, also the `[B, heads, N, N]`
        attention probabilities (computed on the math path, the only one that has them).
        With a `PackedSequences` bias (B = 1), the groups' attention outputs go straight into
        the projection's one output (`packed_attention_rows`, `packed_linear`): no gather copy."""
        B, N, C = x.shape
        # q/k/v are views (unbind) in the [B, N, heads, D] memory order xformers wants; unbind's
        # backward stacks their gradients straight into this layout (one copy, no reshape copy).
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if isinstance(attn_bias, PackedSequences) and not return_weights:
            if B != 1:
                raise ValueError(f"packed attention wants a [1, {attn_bias.total_tokens}, C] input, "
                                 f"got {tuple(x.shape)}")
            blocks = packed_attention_rows(*qkv.squeeze(0).unbind(1), attn_bias, self.backend, scale=self.scale,
                                           dropout_p=dropout_p)
            return self.proj_drop(packed_linear(blocks, self.proj.weight, self.proj.bias)).unsqueeze(0)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if return_weights:
            weights = attention_weights(q, k, scale=self.scale, attn_bias=attn_bias)
            out = (F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights) @ v
        else:
            out = attention(q, k, v, self.backend, scale=self.scale, dropout_p=dropout_p, attn_bias=attn_bias)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return (out, weights) if return_weights else out

    def forward_class_tokens(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        """The attention output at the class tokens only: `[B, N, C]` -> `[B, 1, C]`, or for a pack
        `[1, T, C]` -> `[1, num_sequences, C]`. Queries from the class tokens (the first token of
        every sequence), keys and values from every token; equals `self(x, attn_bias)` at the class
        tokens up to float rounding, for 2/3 of the qkv projection and 1/N of the rest. A tensor
        `attn_bias` keeps its class-token query row; another xformers bias raises ValueError."""
        B, N, C = x.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        q_weight, kv_weight = self.qkv.weight.split([C, 2 * C])
        q_bias, kv_bias = (None, None) if self.qkv.bias is None else self.qkv.bias.split([C, 2 * C])
        kv = F.linear(x, kv_weight, kv_bias)
        dropout_p = self.attn_drop if self.training else 0.0
        if isinstance(attn_bias, PackedSequences):
            tokens = x.squeeze(0)
            q = F.linear(tokens.index_select(0, attn_bias.class_token_rows(x.device)), q_weight, q_bias)
            k, v = kv.squeeze(0).view(N, 2, heads, head_dim).unbind(1)
            out = packed_class_token_attention(q.view(-1, heads, head_dim), k, v, attn_bias, self.backend,
                                               scale=self.scale, dropout_p=dropout_p).unsqueeze(0)
        else:
            if torch.is_tensor(attn_bias):
                attn_bias = attn_bias[..., :1, :]
            elif attn_bias is not None:
                raise ValueError(f"class-token attention takes a tensor or PackedSequences bias, "
                                 f"got {type(attn_bias).__name__}")
            q = F.linear(x[:, :1], q_weight, q_bias).view(B, 1, heads, head_dim).transpose(1, 2)
            k, v = (t.transpose(1, 2) for t in kv.view(B, N, 2, heads, head_dim).unbind(2))
            out = attention(q, k, v, self.backend, scale=self.scale, dropout_p=dropout_p, attn_bias=attn_bias)
            out = out.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}, attn_drop={self.attn_drop}"


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
                 attn_backend: str = "auto", drop_path_impl: str = "subset"):
        super().__init__()
        if drop_path_impl not in DROP_PATH_IMPLS:
            raise ValueError(f"unknown drop_path_impl {drop_path_impl!r}; choose one of {', '.join(DROP_PATH_IMPLS)}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, backend=attn_backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.drop_path_impl = drop_path_impl
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    @property
    def drop_path_prob(self) -> float:
        """This block's stochastic-depth rate (0 when it has none)."""
        return self.drop_path.drop_prob if isinstance(self.drop_path, DropPath) else 0.0

    def attn_residual(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        return self.attn(self.norm1(x), attn_bias)

    def mlp_residual(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def class_token_attn_residual(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        return self.attn.forward_class_tokens(self.norm1(x), attn_bias)

    def forward(self, x: torch.Tensor, attn_bias=None, return_attention: bool = False,
                class_token_only: bool = False) -> torch.Tensor:
        """Next tokens `[B, N, D]`, or with `return_attention` this block's attention probabilities
        instead. `attn_bias` may be a `PackedSequences` for a packed `[1, T, D]` input.
        With `class_token_only`, only the class tokens' next values, `[B, 1, D]` (a pack:
        `[1, num_sequences, D]`): every token still gives keys and values, but queries, projection
        and MLP run on the class tokens alone, with the same stochastic-depth draws as the full block."""
        if return_attention:
            return self.attn(self.norm1(x), attn_bias, return_weights=True)[1]
        pack = attn_bias if isinstance(attn_bias, PackedSequences) else None
        if class_token_only:
            out = x[:, :1] if pack is None else x.squeeze(0).index_select(0, pack.class_token_rows(x.device))[None]
            out_pack, attn_residual = pack and pack.class_tokens(), self.class_token_attn_residual
        else:
            out, out_pack, attn_residual = x, pack, self.attn_residual
        drop_prob = self.drop_path_prob if self.training else 0.0
        if drop_prob == 0.0:
            out = out + attn_residual(x, attn_bias)
            return out + self.mlp_residual(out)
        # A dense per-batch bias cannot follow a subset of the batch: that case drops per sample.
        if self.drop_path_impl == "subset" and (pack is not None or attn_bias is None):
            out = drop_add_residual_subset(x, attn_residual, drop_prob, pack, into=out if class_token_only else None)
            return drop_add_residual_subset(out, self.mlp_residual, drop_prob, out_pack)
        out = out + drop_path(attn_residual(x, attn_bias), drop_prob, True, out_pack)
        return out + drop_path(self.mlp_residual(out), drop_prob, True, out_pack)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, `[B, C, H, W]` -> `[B, H/p * W/p, D]`."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int | list[int] = (224,), patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, attn_backend: str = "auto",
                 drop_path_impl: str = "subset"):
        super().__init__()
        if attn_backend not in ("auto", *BACKENDS):
            raise ValueError(f"unknown attn_backend {attn_backend!r}; choose one of auto, {', '.join(BACKENDS)}")
        if not isinstance(img_size, int):  # official passes a one-element list
            img_size = img_size[0]
        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # Stochastic depth grows linearly with depth, from 0 at the first block.
        drop_path_rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=rate, norm_layer=norm_layer, attn_backend=attn_backend,
                  drop_path_impl=drop_path_impl)
            for rate in drop_path_rates])
        self.activation_checkpointing = False
        self.norm = norm_layer(embed_dim)
        # Kept for checkpoint compatibility; like the official model, forward never applies it.
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embedding for a `grid_h x grid_w` patch grid (bicubic from the native square grid)."""
        side = int(math.sqrt(self.pos_embed.shape[1] - 1))
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # Scale factors (not a target size) with the official +0.1 nudge, so results match
        # official DINO exactly; the nudge keeps float error from losing a row (dino#8).
        patch_pos = F.interpolate(patch_pos, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
                                  mode="bicubic")
        assert patch_pos.shape[-2:] == (grid_h, grid_w), patch_pos.shape
        return torch.cat((cls_pos, patch_pos.flatten(2).transpose(1, 2)), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images `[B, C, H, W]` (H, W multiples of the patch) -> `[B, 1 + patches, D]`, CLS first."""
        B, _, H, W = x.shape
        p = self.patch_embed.patch_size
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), self.patch_embed(x)), dim=1)
        return self.pos_drop(tokens + self.interpolate_pos_encoding(H // p, W // p))

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (less memory,
        about one more forward of compute). The RNG state is restored for the recomputation,
        so stochastic depth draws the same samples twice."""
        self.activation_checkpointing = enabled

    def run_blocks(self, x: torch.Tensor, attn_bias=None, class_token_only: bool = False) -> torch.Tensor:
        """The blocks over tokens `[B, N, D]` (or a pack `[1, T, D]` with a `PackedSequences` bias);
        with `class_token_only` the last block computes the class tokens alone (see `Block.forward`)."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            only = class_token_only and i == last
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_bias, use_reentrant=False, class_token_only=only)
            else:
                x = block(x, attn_bias, class_token_only=only)
        return x

    def forward_features(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        """All output tokens after the final norm, `[B, 1 + patches, D]`, CLS first."""
        return self.norm(self.run_blocks(self.prepare_tokens(x), attn_bias))

    def forward_packed(self, batches: list[torch.Tensor]) -> torch.Tensor:
        """CLS embeddings of several image batches of different sizes, `[sum B_i, D]` in order,
        from ONE pass of the blocks over all their tokens packed into a `[1, T, D]` sequence.

        Equal to `torch.cat([self(x) for x in batches])` up to float rounding: tokens only
        meet inside attention, which stays within each image.
        """
        tokens = [self.prepare_tokens(x) for x in batches]
        pack = PackedSequences(tuple((t.shape[0], t.shape[1]) for t in tokens))
        x = torch.cat([t.flatten(0, 1) for t in tokens]).unsqueeze(0)
        # The final norm is per token: normalising only the CLS tokens gives the same CLS outputs.
        return self.norm(self.run_blocks(x, pack, class_token_only=True).squeeze(0))

    def forward(self, x: torch.Tensor, attn_bias=None) -> torch.Tensor:
        """The CLS embedding `[B, D]`: `forward_features(x)[:, 0]` up to float rounding, with the
        last block computed at the class token alone."""
        return self.norm(self.run_blocks(self.prepare_tokens(x), attn_bias, class_token_only=True))[:, 0]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's attention probabilities, `[B, heads, N, N]`."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The normed output tokens of the last `n` blocks, oldest first."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


def _init_weights(module: nn.Module) -> None:
    # The official init; the patch-embedding conv keeps PyTorch's default, as there.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _vit(patch_size: int, drop_path_rate: float, arch: dict, overrides: dict) -> VisionTransformer:
    # Unlike the official factories, kwargs may override the architecture (depth=2 for a quick test).
    arch = dict(depth=12, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **arch)
    return VisionTransformer(patch_size=patch_size, drop_path_rate=drop_path_rate, **{**arch, **overrides})


def vit_tiny(patch_size: int = 16, drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    return _vit(patch_size, drop_path_rate, dict(embed_dim=192, num_heads=3), kwargs)


def vit_small(patch_size: int = 16, drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    return _vit(patch_size, drop_path_rate, dict(embed_dim=384, num_heads=6), kwargs)


def vit_base(patch_size: int = 16, drop_path_rate: float = 0.0, **kwargs) -> VisionTransformer:
    return _vit(patch_size, drop_path_rate, dict(embed_dim=768, num_heads=12), kwargs)
