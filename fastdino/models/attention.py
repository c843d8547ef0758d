"""Scaled dot-product attention behind one function, with interchangeable backends.

`attention(q, k, v, backend)` takes and returns `[B, heads, N, head_dim]`:
  xformers  memory-efficient CUDA kernels (they want `[B, N, heads, D]`; we transpose views)
  sdpa      torch.nn.functional.scaled_dot_product_attention (flash / efficient / math in torch)
  math      softmax(q k^T * scale) v written out: the reference, and the only one with weights
  auto      xformers where its kernels really run on the device, else sdpa

Whether xformers runs is decided by running it, once per device: a wheel built for
another torch imports fine but has no operators, and it never has CPU kernels.

Packed sequences: with `attn_bias=PackedSequences(...)`, q/k/v are `[1, heads, T, D]`
holding several batches of sequences of different lengths back to back (the crops of a
multi-crop step: 197-token and 37-token sequences). Every sequence attends only to
itself. xformers runs the whole pack in one kernel with a `BlockDiagonalMask`; sdpa and
math run one call per group of equal-length sequences, viewed as `[count, heads, length, D]`
(no dense block mask, no padding).
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("xformers", "sdpa", "math")


@dataclass(frozen=True)
class PackedSequences:
    """Layout of sequences packed along the token axis of a `[1, T, ...]` tensor:
    `groups[i] = (count, length)` is `count` sequences of `length` tokens, groups in order."""

    groups: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if not self.groups or any(count < 1 or length < 1 for count, length in self.groups):
            raise ValueError(f"PackedSequences needs groups of >= 1 sequences of >= 1 tokens, got {self.groups}")

    @property
    def total_tokens(self) -> int:
        return sum(count * length for count, length in self.groups)

    @property
    def num_sequences(self) -> int:
        return sum(count for count, _ in self.groups)

    def group_starts(self) -> list[int]:
        """Token offset of each group's first sequence."""
        starts, offset = [], 0
        for count, length in self.groups:
            starts.append(offset)
            offset += count * length
        return starts

    def xformers_bias(self, device: torch.device):
        """The xformers `BlockDiagonalMask` of this layout (cached: it holds a device tensor)."""
        return _block_diagonal_mask(self.groups, str(device))


# Subset stochastic depth makes a few layouts per block (kept counts vary by one): room for them all.
@functools.lru_cache(maxsize=512)
def _block_diagonal_mask(groups: tuple[tuple[int, int], ...], device: str):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    seqlens = [length for count, length in groups for _ in range(count)]
    return BlockDiagonalMask.from_seqlens(seqlens, device=torch.device(device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", *,
              scale: float | None = None, dropout_p: float = 0.0, attn_bias=None) -> torch.Tensor:
    """softmax(q k^T * scale + attn_bias) v over `[B, heads, N, head_dim]` tensors.

    `attn_bias` is an additive tensor broadcastable to `[B, heads, N, N]` (or a boolean
    keep-mask for sdpa/math), a `PackedSequences` for `[1, heads, T, D]` packed inputs, or
    with xformers any xformers AttentionBias.
    """
    backend = resolve_attention_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(attn_bias, PackedSequences):
        return _packed_attention(q, k, v, backend, scale, dropout_p, attn_bias)
    if backend == "xformers":
        return _xformers_attention(q, k, v, attn_bias, dropout_p, scale)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    weights = attention_weights(q, k, scale=scale, attn_bias=attn_bias)
    return F.dropout(weights, p=dropout_p) @ v


def _packed_attention(q, k, v, backend: str, scale: float, dropout_p: float,
                      pack: PackedSequences) -> torch.Tensor:
    if q.shape[0] != 1 or q.shape[2] != pack.total_tokens:
        raise ValueError(f"packed attention wants [1, heads, {pack.total_tokens}, D] inputs, got {tuple(q.shape)}")
    if backend == "xformers":
        return _xformers_attention(q, k, v, pack.xformers_bias(q.device), dropout_p, scale)
    outputs = []
    for (count, length), start in zip(pack.groups, pack.group_starts()):
        # [1, H, count*length, D] -> [count, H, length, D]: a view (only the token axis is split).
        group = [t[0, :, start:start + count * length].unflatten(1, (count, length)).transpose(0, 1)
                 for t in (q, k, v)]
        out = attention(*group, backend, scale=scale, dropout_p=dropout_p)
        outputs.append(out.transpose(0, 1).flatten(1, 2))
    return torch.cat(outputs, dim=1).unsqueeze(0)


# Kept out of torch.compile graphs: whether dynamo traces xformers' operator dispatch and
# AttentionBias objects depends on the xformers build (not testable here without a GPU); a
# compiled block runs this attention eagerly between its compiled halves.
@torch.compiler.disable
def _xformers_attention(q, k, v, attn_bias, dropout_p: float, scale: float) -> torch.Tensor:
    import xformers.ops as xops
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=attn_bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def attention_weights(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None,
                      attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The `[B, heads, N, N]` attention probabilities (rows sum to 1)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:  # sdpa convention: True means "may attend"
            scores = scores.masked_fill(~attn_bias, float("-inf"))
        else:
            scores = scores + attn_bias
    # Softmax in fp32 so bf16 activations do not lose the small weights.
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)


# torch.compile calls this once while tracing and bakes the answer in, instead of
# tracing into the probe (which runs kernels and logs).
@torch.compiler.assume_constant_result
def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend `name` means on `device`; raises if xformers is asked for and cannot run."""
    if name not in ("auto", *BACKENDS):
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0": one probe, one log
    device = str(device)
    if name == "auto":
        return _resolve_auto(device)
    if name == "xformers":
        reason = xformers_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"attention backend 'xformers' cannot run on {device}: {reason}; "
                               "use 'auto' or 'sdpa'")
    return name


@functools.lru_cache(maxsize=None)
def _resolve_auto(device: str) -> str:
    # Cached per device so the choice is logged once, not on every forward.
    reason = xformers_unavailable_reason(device)
    if reason is None:
        logger.info("attention backend auto -> xformers: memory-efficient kernels run on %s", device)
        return "xformers"
    logger.info("attention backend auto -> sdpa: %s", reason)
    return "sdpa"


@functools.lru_cache(maxsize=None)
def xformers_unavailable_reason(device: str) -> str | None:
    """None when xformers' memory_efficient_attention runs forward and backward on `device`
    in fp32 and bf16, else a one-line reason why not."""
    if torch.device(device).type != "cuda":
        return f"xformers has no kernels for {device} tensors"
    try:
        import xformers.ops as xops
    except Exception as error:  # ImportError, or a broken build failing while it loads
        return f"xformers does not import ({type(error).__name__}: {error})"
    try:
        # The probe may first run inside no_grad / inference_mode (an eval pass); backward needs grad.
        with torch.inference_mode(False), torch.enable_grad():
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(1, 8, 2, 64, device=device, dtype=dtype, requires_grad=True)
                xops.memory_efficient_attention(x, x, x).sum().backward()
    except Exception as error:  # "No operator found ..." when the compiled ops did not load
        summary = " ".join(str(error).split())[:300]
        return f"xformers memory_efficient_attention does not run ({type(error).__name__}: {summary})"
    return None
