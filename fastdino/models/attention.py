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

Packed attention without gather copies (`packed_attention_rows` + `packed_linear`, what the
ViT's attention runs): sdpa has no `out=` argument, so the groups' outputs cannot be written
into one buffer by sdpa itself, and concatenating them (then reshaping heads into channels)
copies the whole attention output twice per block. Instead each group's output stays where
sdpa wrote it (sdpa's CPU flash and CUDA flash/efficient kernels return the token-major
`[count, length, heads, D]` layout, so the `[rows, heads*D]` block is a view), and the output
projection writes each group's rows of its one `[T, C]` result with its own matmul (`out=`
a row slice). q/k/v enter as token-axis `split`s of the fused qkv projection, whose backward
is one concatenation, not a zero-filled full-size gradient per group and per q/k/v (what
indexing or slicing the token axis costs in the backward).
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

    def xformers_bias(self, device: torch.device, class_token_queries: bool = False):
        """The xformers `BlockDiagonalMask` of this layout (cached: it holds a device tensor); with
        `class_token_queries`, the mask for one query per sequence (its class token) over its keys."""
        return _block_diagonal_mask(self.groups, str(device), class_token_queries)

    def class_tokens(self) -> "PackedSequences":
        """The layout of this pack's class tokens alone: the same groups, one token per sequence."""
        return PackedSequences(tuple((count, 1) for count, _ in self.groups))

    def class_token_rows(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Token index of every sequence's first token (its class token), `[num_sequences]` int64, in order."""
        return _class_token_rows(self.groups, str(device))


# Subset stochastic depth makes a few layouts per block (kept counts vary by one): room for them all.
@functools.lru_cache(maxsize=512)
def _block_diagonal_mask(groups: tuple[tuple[int, int], ...], device: str, class_token_queries: bool):
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    seqlens = [length for count, length in groups for _ in range(count)]
    if class_token_queries:
        return BlockDiagonalMask.from_seqlens([1] * len(seqlens), seqlens, device=torch.device(device))
    return BlockDiagonalMask.from_seqlens(seqlens, device=torch.device(device))


@functools.lru_cache(maxsize=512)
def _class_token_rows(groups: tuple[tuple[int, int], ...], device: str) -> torch.Tensor:
    starts, offset = [], 0
    for count, length in groups:
        starts.append(torch.arange(count) * length + offset)
        offset += count * length
    return torch.cat(starts).to(device)


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
    # Only with a rate: F.dropout(p=0) still draws a mask, which costs time and moves the RNG stream.
    return (F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights) @ v


def _packed_attention(q, k, v, backend: str, scale: float, dropout_p: float,
                      pack: PackedSequences) -> torch.Tensor:
    if q.shape[0] != 1 or q.shape[2] != pack.total_tokens:
        raise ValueError(f"packed attention wants [1, heads, {pack.total_tokens}, D] inputs, got {tuple(q.shape)}")
    _, heads, tokens, head_dim = q.shape
    # squeeze, not [0]: its backward is a view, where select's writes a zero-filled full-size gradient.
    blocks = packed_attention_rows(*(t.squeeze(0).transpose(0, 1) for t in (q, k, v)), pack, backend,
                                   scale=scale, dropout_p=dropout_p)
    out = blocks[0] if len(blocks) == 1 else torch.cat(blocks)  # one gather copy: this API returns one tensor
    return out.view(tokens, heads, head_dim).transpose(0, 1).unsqueeze(0)


def packed_attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PackedSequences,
                          backend: str = "auto", *, scale: float | None = None,
                          dropout_p: float = 0.0) -> list[torch.Tensor]:
    """Attention over sequences packed along the token axis, as row blocks for the output projection.

    q, k, v: `[T, heads, D]` each, T = `pack.total_tokens` (views of the fused qkv projection,
    `qkv.view(T, 3, heads, D).unbind(1)`, need no copy). Returns `[rows, heads * D]` blocks that
    cover the T tokens in order: one per group of equal-length sequences (sdpa, math), or one for
    the whole pack (xformers, one block-diagonal kernel). Channels are head-major (head h holds
    columns h*D to (h+1)*D), the layout `Attention` projects. A block is a view of the backend's
    output where that output is token-major (sdpa's flash and efficient kernels, xformers), a
    copy otherwise (math). Feed the blocks to `packed_linear`; `torch.cat(blocks)` equals
    `attention(...)` with this pack (the twin, one copy). Raises ValueError if T != pack.total_tokens.
    """
    backend = resolve_attention_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tokens, heads, head_dim = q.shape
    if tokens != pack.total_tokens:
        raise ValueError(f"packed attention wants [{pack.total_tokens}, heads, D] inputs, got {tuple(q.shape)}")
    if backend == "xformers":
        out = _xformers_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)),
                                  pack.xformers_bias(q.device), dropout_p, scale)
        return [out.squeeze(0).transpose(0, 1).reshape(tokens, heads * head_dim)]
    sizes = [count * length for count, length in pack.groups]
    blocks = []
    for (count, length), *group in zip(pack.groups, q.split(sizes), k.split(sizes), v.split(sizes)):
        # [count*length, H, D] -> [count, H, length, D]: a view (only the token axis is split).
        out = attention(*(t.unflatten(0, (count, length)).transpose(1, 2) for t in group), backend,
                        scale=scale, dropout_p=dropout_p)
        blocks.append(out.transpose(1, 2).reshape(count * length, heads * head_dim))
    return blocks


def packed_class_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PackedSequences,
                                 backend: str = "auto", *, scale: float | None = None,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of each packed sequence's class token over its own sequence.

    q: `[num_sequences, heads, D]`, the class tokens' queries in pack order; k, v: `[T, heads, D]`
    (T = `pack.total_tokens`). Returns `[num_sequences, heads * D]`, head-major channels: the rows of
    `torch.cat(packed_attention_rows(...))` at `pack.class_token_rows()`, up to float rounding.
    xformers runs it as one kernel (a block-diagonal mask of one query per sequence); sdpa and math
    as one call per group, `[count, heads, 1, D]` queries over `[count, heads, length, D]` keys.
    Raises ValueError when the shapes do not match the pack.
    """
    backend = resolve_attention_backend(backend, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sequences, heads, head_dim = q.shape
    if sequences != pack.num_sequences or k.shape[0] != pack.total_tokens:
        raise ValueError(f"class-token attention wants [{pack.num_sequences}, heads, D] queries and "
                         f"[{pack.total_tokens}, heads, D] keys, got {tuple(q.shape)} and {tuple(k.shape)}")
    if backend == "xformers":
        out = _xformers_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)),
                                  pack.xformers_bias(q.device, class_token_queries=True), dropout_p, scale)
        return out.squeeze(0).transpose(0, 1).reshape(sequences, heads * head_dim)
    sizes = [count * length for count, length in pack.groups]
    blocks = []
    for (count, length), q_group, k_group, v_group in zip(pack.groups, q.split([c for c, _ in pack.groups]),
                                                          k.split(sizes), v.split(sizes)):
        out = attention(q_group.unsqueeze(2),
                        *(t.unflatten(0, (count, length)).transpose(1, 2) for t in (k_group, v_group)),
                        backend, scale=scale, dropout_p=dropout_p)
        blocks.append(out.reshape(count, heads * head_dim))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def packed_linear(blocks: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(torch.cat(blocks), weight, bias)` without the concatenation: blocks `[rows_i, in]`,
    weight `[out, in]`, bias `[out]` -> `[sum rows_i, out]`, each block's rows of the output written
    by its own matmul. Under autocast it computes in the autocast dtype, as F.linear does.

    Numerics against the twin (F.linear over the concatenation), fp32 and bf16: the output and
    the blocks' gradients are the same per-row products, bit-identical where the BLAS runs the same
    kernel for a block as for the whole (on the CPU: blocks of 15 rows or more; DINO's have
    thousands), else within float rounding (a few ulps); the weight gradient is the very GEMM
    F.linear's backward runs, over the blocks concatenated in the backward (one `[rows, in]` copy
    there instead of two in every forward), so bit-identical; the bias gradient is the same sum.
    Only the blocks are kept for the backward (the attention keeps them anyway), not their
    concatenation: one `[rows, in]` activation less per call.
    """
    if len(blocks) == 1:
        return F.linear(blocks[0], weight, bias)
    device_type = blocks[0].device.type
    if torch.is_autocast_enabled(device_type):
        # The autograd.Function below runs out= matmuls, which autocast does not cast: cast as F.linear would.
        dtype = torch.get_autocast_dtype(device_type)
        blocks = [b.to(dtype) for b in blocks]
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _PackedLinear.apply(weight, bias, *blocks)


class _PackedLinear(torch.autograd.Function):
    """Linear over row blocks into one output (see `packed_linear`)."""

    @staticmethod
    def forward(ctx, weight, bias, *blocks):
        out = blocks[0].new_empty(sum(b.shape[0] for b in blocks), weight.shape[0])
        row = 0
        for block in blocks:
            rows = out.narrow(0, row, block.shape[0])  # contiguous rows: the matmul writes in place, no copy
            if bias is None:
                torch.mm(block, weight.t(), out=rows)
            else:
                torch.addmm(bias, block, weight.t(), out=rows)
            row += block.shape[0]
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, *blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, *blocks = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_blocks, row = [], 0
        # The backward may run inside an autocast region: keep the forward's dtype.
        with torch.autocast(grad_out.device.type, enabled=False):
            for i, block in enumerate(blocks):
                grad_rows = grad_out.narrow(0, row, block.shape[0])
                row += block.shape[0]
                grad_blocks.append(grad_rows.mm(weight) if needs[2 + i] else None)
            # One GEMM over all rows, as F.linear's backward (addmm's mat2 gradient, transposed): a
            # sum of per-block GEMMs would round differently, and the fp32/bf16 curves would drift.
            grad_weight = grad_out.t().mm(torch.cat(blocks)) if needs[0] else None
            grad_bias = grad_out.sum(0) if ctx.has_bias and needs[1] else None
        return grad_weight, grad_bias, *grad_blocks


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
