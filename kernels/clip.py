"""Per-tensor scaling, tensors[i] *= scales[i] with the scales on the device, over a whole
tensor list in one Triton launch: the multiply of DINO's per-parameter gradient clipping
(official `utils.clip_gradients`: each gradient times clip / (norm + 1e-6) where that is < 1).

Why a kernel: torch has no multi-tensor multiply by a different device scalar per tensor.
`torch._foreach_mul_(tensors, list_of_0d_tensors)` fails its fast path's same-shape check and
runs one kernel per tensor (about 150 launches a step for ViT-S/16 + head); its `.Tensor`
overload takes one scalar for all, a 1-D tensor of scales raises, and `_foreach_addcmul_`
takes host scalars (a host sync to get them).

Multi-tensor design, as `fastdino_kernels.ema`: the kernel gets a table of the tensors' data
pointers, sizes and dtypes and a table of (tensor, first element) chunks, one program per
chunk, and reads its tensor's scale from `scales`. The tables depend only on the addresses,
sizes and dtypes. Gradients, unlike parameters, may be new allocations every step
(`zero_grad(set_to_none=True)`), usually at the same addresses (the caching allocator replays
the same requests), so the tables are cached, and where they miss they are built in pinned
host memory and copied without a host sync.

Work: a program whose scale is exactly 1 (a gradient already within the clip: most of them)
reads and writes nothing, as the official loop leaves such a gradient alone (x * 1 == x for
every x but NaN, whose payload torch's multiply might change; it stays NaN). Otherwise each
program moves its base address to its chunk once and loops on int32 offsets, in a loop of its
tensor's dtype (so that each loop's accesses get their own register layout, with no
conversion between the two); whole tiles go without a mask and, where every tensor starts on
16 bytes (separate allocations always do; views into ZeRO's flat gradient partition may not,
and the launcher checks), with 16-byte vector loads and stores.

Bit-exactness: the product is taken in fp32 (torch's opmath for fp32 and bf16) of the tensor's
value and the fp32 scale, and rounded once into the tensor's dtype: for fp32 tensors exactly
`torch._foreach_mul_(tensors, list(scales.unbind()))`, for bf16 tensors `t.mul_(s)` with
`s` a fp32 CPU scalar. (torch on CUDA with a 0-d CUDA fp32 scale would first round the scale
to bf16; the PyTorch twin below multiplies in fp32 on every device instead.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdino_kernels import PointerTables, use_triton

CHUNK = 16384  # elements per program
# fp32 elements per loop step: 8 warps x 32 threads x 4, 16 bytes a thread; bf16 steps over 2 * BLOCK,
# 16 bytes a thread too. (With more fp32 elements a thread, Triton gives the load 32 bytes a thread
# but the store 16, and converts between the two through shared memory on every step.)
BLOCK = 1024
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Clipping calls this once per parameter group (a handful); a few more entries for gradients
# that came back at other addresses.
_TABLE_CACHE_SIZE = 16


@triton.jit
def _scale_chunk(addr, end, scale, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """x[:end] <- x[:end] * scale in fp32, rounded once into DTYPE; x: the DTYPE elements at byte address `addr`."""
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:  # `addr` is 16-byte aligned. The hint goes on the pointer made here: Triton drops one on
        ptr = tl.multiple_of(ptr, 16)  # the integer, or on a pointer passed in as an argument.
    # Whole tiles without a mask (an element-granular mask would keep accesses scalar), then the tail.
    full = end // BLOCK * BLOCK
    for off in range(0, full, BLOCK):
        x = ptr + (off + tl.arange(0, BLOCK))
        tl.store(x, (tl.load(x).to(tl.float32) * scale).to(DTYPE))
    if full < end:
        offs = full + tl.arange(0, BLOCK)
        x = ptr + offs
        tl.store(x, (tl.load(x, mask=offs < end).to(tl.float32) * scale).to(DTYPE), mask=offs < end)


@triton.jit
def _scale_kernel(
    PTRS,  # [n_tensors] int64: data pointer of each tensor
    NUMELS,  # [n_tensors] int64
    DTYPES,  # [n_tensors] int64: 1 if the tensor is bf16, 0 if fp32
    CHUNK_TENSOR,  # [n_chunks] int64: tensor of each chunk
    CHUNK_START,  # [n_chunks] int64: first element of each chunk
    SCALES,  # [n_tensors] fp32: the factor of each tensor
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)  # one program per chunk: the grid is exactly n_chunks
    j = tl.load(CHUNK_TENSOR + pid)
    scale = tl.load(SCALES + j)
    if scale != 1.0:  # x * 1 == x: a gradient within the clip is neither read nor written
        start = tl.load(CHUNK_START + pid)
        is_bf16 = tl.load(DTYPES + j) != 0
        # The address moves to the chunk's first element once; the loop then runs on int32 offsets
        # from 0, which keeps 64-bit address arithmetic out of it.
        addr = tl.load(PTRS + j) + start * tl.where(is_bf16, 2, 4)
        end = (tl.minimum(start + CHUNK, tl.load(NUMELS + j)) - start).to(tl.int32)
        # One loop per dtype, not a dtype branch inside one loop: each loop's accesses then get their
        # own register layout (8 bf16 or 4 fp32 per 16 bytes), with no conversion between the two
        # through shared memory. ALIGNED: every tensor starts on 16 bytes (the launcher checks), and
        # then so does every chunk (CHUNK elements are a multiple of 16 bytes).
        if is_bf16:
            _scale_chunk(addr, end, scale, tl.bfloat16, 2 * BLOCK, ALIGNED)
        else:
            _scale_chunk(addr, end, scale, tl.float32, BLOCK, ALIGNED)


_tables = PointerTables(CHUNK, _TABLE_CACHE_SIZE)


def _chunk_tables(tensors: list[torch.Tensor], device: torch.device) -> tuple[tuple[torch.Tensor, ...], int, bool]:
    """(pointer, size, dtype, chunk-tensor, chunk-start tables on `device`, number of chunks, all
    16-byte aligned), cached."""
    key = (device, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
    numels = [t.numel() for t in tensors]
    return _tables.get(key, numels, [[t.data_ptr() for t in tensors], numels, [_DTYPE_CODES[t.dtype] for t in tensors]],
                       device, pointer_columns=1)


def _check(tensors: list[torch.Tensor], scales: torch.Tensor) -> None:
    if scales.dtype != torch.float32 or scales.shape != (len(tensors),):
        raise ValueError(f"scale_tensors_: scales must be a fp32 vector of one entry per tensor ({len(tensors)}), "
                         f"got {scales.dtype} of shape {tuple(scales.shape)}")
    for t in tensors:
        if t.device != scales.device:
            raise ValueError(f"scale_tensors_: tensors and scales must be on one device, got {t.device} "
                             f"and {scales.device}")
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"scale_tensors_: tensors must be fp32 or bf16, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError("scale_tensors_: tensors must be contiguous")


@torch.no_grad()
def scale_tensors_(tensors: list[torch.Tensor], scales: torch.Tensor) -> None:
    """In place, in one launch: tensors[i] <- tensors[i] * scales[i].

    tensors: contiguous fp32 or bf16 tensors (mixed freely, any shapes, views into one buffer
    at any element offset included) on one device; scales: fp32 `[len(tensors)]` on the same
    device. The product is fp32, rounded once into each tensor's dtype (bit-exact with
    torch's multiply by a fp32 scalar; see the module docstring); a scale of exactly 1 leaves
    its tensor untouched. Raises ValueError/TypeError for other inputs, RuntimeError where the
    Triton kernel cannot run (see `use_triton`): callers choose `scale_tensors_reference_`
    there, never by silent fallback.
    """
    _check(tensors, scales)
    if not tensors:
        return  # nothing to scale, no launch
    device = scales.device
    if not use_triton(_scale_kernel, device):
        raise RuntimeError(f"scale_tensors_: the Triton kernel cannot run on {device.type} tensors here "
                           "(CUDA, or CPU with TRITON_INTERPRET=1 set before triton is imported); "
                           "use scale_tensors_reference_")
    tables, n_chunks, aligned = _chunk_tables(tensors, device)
    if n_chunks == 0:
        return
    _scale_kernel[(n_chunks,)](
        *tables, scales.contiguous(),
        CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=aligned, num_warps=8, enable_fp_fusion=False,
    )


@torch.no_grad()
def scale_tensors_reference_(tensors: list[torch.Tensor], scales: torch.Tensor) -> None:
    """PyTorch twin of `scale_tensors_`, same arguments and result: fp32 tensors with
    `torch._foreach_mul_` by 0-d fp32 scales (one kernel per tensor on CUDA), bf16 ones
    multiplied in fp32 and copied back (torch's CUDA multiply would round a 0-d fp32 scale
    to bf16 first)."""
    _check(tensors, scales)
    per_tensor = scales.unbind()
    fp32 = [(t, s) for t, s in zip(tensors, per_tensor) if t.dtype == torch.float32]
    bf16 = [(t, s) for t, s in zip(tensors, per_tensor) if t.dtype == torch.bfloat16]
    if fp32:
        torch._foreach_mul_([t for t, _ in fp32], [s for _, s in fp32])
    if bf16:
        products = torch._foreach_mul([t.float() for t, _ in bf16], [s for _, s in bf16])
        torch._foreach_copy_([t for t, _ in bf16], products)
