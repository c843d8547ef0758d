"""Scaled dot-product attention behind one function, with interchangeable backends.

`attention(q, k, v, backend)` takes and returns `[B, heads, N, head_dim]`:
  xformers  memory-efficient CUDA kernels (they want `[B, N, heads, D]`; we transpose views)
  sdpa      torch.nn.functional.scaled_dot_product_attention (flash / efficient / math in torch)
  math      softmax(q k^T * scale) v written out: the reference, and the only one with weights
  auto      xformers where its kernels really run on the device, else sdpa

Whether xformers runs is decided by running it, once per device: a wheel built for
another torch imports fine but has no operators, and it never has CPU kernels.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("xformers", "sdpa", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto", *,
              scale: float | None = None, dropout_p: float = 0.0, attn_bias=None) -> torch.Tensor:
    """softmax(q k^T * scale + attn_bias) v over `[B, heads, N, head_dim]` tensors.

    `attn_bias` is an additive tensor broadcastable to `[B, heads, N, N]` (or a boolean
    keep-mask for sdpa/math); with xformers it may also be an xformers AttentionBias such
    as a BlockDiagonalMask for packed sequences.
    """
    backend = resolve_attention_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "xformers":
        import xformers.ops as xops
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=attn_bias, p=dropout_p, scale=scale)
        return out.transpose(1, 2)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)
    weights = attention_weights(q, k, scale=scale, attn_bias=attn_bias)
    return F.dropout(weights, p=dropout_p) @ v


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
