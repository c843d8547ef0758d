"""Teacher EMA, teacher <- m * teacher + (1 - m) * student, over a whole parameter list in
one Triton launch.

Multi-tensor design: the kernel gets a table of the tensors' data pointers, sizes and dtypes
and a table of (tensor, first element) chunks, one program per chunk. The teacher and the
student are separate nn.Modules whose parameters are separate allocations (and DeepSpeed
owns its own flat buffers), so flattening them into one buffer would mean re-plumbing every
parameter as a view; a pointer table works on any list of contiguous tensors, flat buffers
included. The tables depend only on the addresses and sizes, which do not change between
steps, so they are built and copied to the device once and cached.

Accesses: each program moves its two base addresses to its chunk once and loops on int32
offsets (64-bit address arithmetic out of the loop), one loop per dtype pair; whole tiles go
without a mask and, where every tensor starts on 16 bytes (separate allocations always do;
views into DeepSpeed's flat buffers may not, and the launcher checks), with 16-byte vector
loads and stores.

Bit-exactness: torch.lerp(self, end, w) computes in fp32 (opmath) as
    fma(w, end - self, self)          if |w| < 0.5
    fma(w - 1, end - self, end)       otherwise
(nvcc contracts `self + w*(end - self)` / `end - (end - self)*(1 - w)` into exactly these
fmas, and the CPU kernel uses `fmadd(coeff, end - start, base)`). The kernel does the same
with an explicit tl.fma, so no compiler contraction choice can change the rounding, and
rounds once into the teacher's dtype.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastdino_kernels import PointerTables, use_triton

CHUNK = 16384  # elements per program
# fp32 elements per loop step: 8 warps x 32 threads x 4, 16 bytes a thread; a pair with a bf16
# side steps over 2 * BLOCK (16 bytes a thread of bf16). With more fp32 elements a thread, Triton
# gives the loads 32 bytes a thread but the store 16 and converts between the two through shared
# memory on every step.
BLOCK = 1024
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_TABLE_CACHE_SIZE = 8


@triton.jit
def _lerp_chunk(t_addr, s_addr, end, coef, base_is_student, T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """t[:end] <- fma(coef, s - t, s or t) in fp32, rounded once into T_DTYPE (see the module
    docstring); t, s: the elements at byte addresses `t_addr`, `s_addr`."""
    t_ptr = t_addr.to(tl.pointer_type(T_DTYPE))
    s_ptr = s_addr.to(tl.pointer_type(S_DTYPE))
    if ALIGNED:  # the bases are 16-byte aligned. The hint goes on the pointers made here: Triton drops
        t_ptr = tl.multiple_of(t_ptr, 16)  # one on the integer, or on a pointer passed as an argument.
        s_ptr = tl.multiple_of(s_ptr, 16)
    # Whole tiles without a mask (an element-granular mask would keep accesses scalar), then the tail.
    full = end // BLOCK * BLOCK
    for off in range(0, full, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        t = tl.load(t_ptr + offs).to(tl.float32)
        s = tl.load(s_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, tl.fma(coef, s - t, tl.where(base_is_student, s, t)).to(T_DTYPE))
    if full < end:
        offs = full + tl.arange(0, BLOCK)
        mask = offs < end
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(t_ptr + offs, tl.fma(coef, s - t, tl.where(base_is_student, s, t)).to(T_DTYPE), mask=mask)


@triton.jit
def _ema_kernel(
    TEACHER_PTRS,  # [n_tensors] int64: data pointer of each teacher tensor
    STUDENT_PTRS,  # [n_tensors] int64: data pointer of each student tensor
    NUMELS,  # [n_tensors] int64
    DTYPES,  # [n_tensors] int64: bit 0 set if the teacher is bf16, bit 1 the student (else fp32)
    CHUNK_TENSOR,  # [n_chunks] int64: tensor of each chunk
    CHUNK_START,  # [n_chunks] int64: first element of each chunk
    coef,  # fp32 lerp coefficient: w if w < 0.5 else w - 1
    from_student,  # 0: base is the teacher (w < 0.5), 1: base is the student
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)  # one program per chunk: the grid is exactly n_chunks
    j = tl.load(CHUNK_TENSOR + pid)
    start = tl.load(CHUNK_START + pid)
    dtypes = tl.load(DTYPES + j)
    base_is_student = from_student != 0
    t_bf16 = (dtypes & 1) != 0
    s_bf16 = (dtypes & 2) != 0
    # Addresses move to the chunk's first element once; the loop then runs on int32 offsets from 0,
    # which keeps 64-bit address arithmetic out of it.
    t_addr = tl.load(TEACHER_PTRS + j) + start * tl.where(t_bf16, 2, 4)
    s_addr = tl.load(STUDENT_PTRS + j) + start * tl.where(s_bf16, 2, 4)
    end = (tl.minimum(start + CHUNK, tl.load(NUMELS + j)) - start).to(tl.int32)
    # One loop per dtype pair, not a dtype branch inside one loop: each loop's accesses get their own
    # register layout, with no conversion through shared memory. ALIGNED: every tensor starts on 16
    # bytes (the launcher checks), and then so does every chunk (CHUNK elements are 16-byte multiples).
    if t_bf16:
        if s_bf16:
            _lerp_chunk(t_addr, s_addr, end, coef, base_is_student, tl.bfloat16, tl.bfloat16, 2 * BLOCK, ALIGNED)
        else:
            _lerp_chunk(t_addr, s_addr, end, coef, base_is_student, tl.bfloat16, tl.float32, 2 * BLOCK, ALIGNED)
    else:
        if s_bf16:
            _lerp_chunk(t_addr, s_addr, end, coef, base_is_student, tl.float32, tl.bfloat16, 2 * BLOCK, ALIGNED)
        else:
            _lerp_chunk(t_addr, s_addr, end, coef, base_is_student, tl.float32, tl.float32, BLOCK, ALIGNED)


_tables = PointerTables(CHUNK, _TABLE_CACHE_SIZE)


def _chunk_tables(teachers: list[torch.Tensor], students: list[torch.Tensor],
                  device: torch.device) -> tuple[tuple[torch.Tensor, ...], int, bool]:
    """(pointer, size, dtype, chunk-tensor, chunk-start tables on `device`, number of chunks, all
    16-byte aligned), cached."""
    key = (device, tuple((t.data_ptr(), s.data_ptr(), t.numel(), t.dtype, s.dtype) for t, s in zip(teachers, students)))
    numels = [t.numel() for t in teachers]
    return _tables.get(key, numels, [[t.data_ptr() for t in teachers], [s.data_ptr() for s in students], numels,
                                     [_DTYPE_CODES[t.dtype] | _DTYPE_CODES[s.dtype] << 1
                                      for t, s in zip(teachers, students)]], device, pointer_columns=2)


def _lerp_coefficients(momentum: float) -> tuple[float, int]:
    """(coef, base is student) such that fma(coef, s - t, base) == torch.lerp(t, s, 1 - momentum)."""
    weight = np.float32(1.0 - momentum)  # torch casts the double weight to its fp32 opmath
    if abs(weight) < 0.5:
        return float(weight), 0
    return float(weight - np.float32(1.0)), 1


def _check(teachers: list[torch.Tensor], students: list[torch.Tensor]) -> torch.device:
    if len(teachers) != len(students):
        raise ValueError(f"ema_update_tensors_: {len(teachers)} teacher tensors but {len(students)} student tensors")
    if not teachers:
        return torch.device("cpu")
    device = teachers[0].device
    for t, s in zip(teachers, students):
        if t.shape != s.shape:
            raise ValueError(f"ema_update_tensors_: shapes differ: {tuple(t.shape)} vs {tuple(s.shape)}")
        if t.device != device or s.device != device:
            raise ValueError("ema_update_tensors_: all tensors must be on one device")
        if t.dtype not in _DTYPE_CODES or s.dtype not in _DTYPE_CODES:
            raise TypeError(f"ema_update_tensors_: tensors must be fp32 or bf16, got {t.dtype} and {s.dtype}")
        if not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError("ema_update_tensors_: tensors must be contiguous")
    return device


@torch.no_grad()
def ema_update_tensors_(teacher_tensors: list[torch.Tensor], student_tensors: list[torch.Tensor],
                        momentum: float) -> None:
    """In place, in one launch: t <- lerp(t, s, 1 - momentum) for every (t, s) pair.

    Teachers and students are contiguous fp32 or bf16 (mixed freely); the arithmetic is fp32
    and rounds once into the teacher, bit-exact with torch.lerp for fp32 tensors.
    Raises where the Triton kernel cannot run (see `use_triton`): callers choose
    `ema_update_tensors_reference_` there, never by silent fallback.
    """
    device = _check(teacher_tensors, student_tensors)
    if not teacher_tensors:
        return  # nothing to update, on no device
    if not use_triton(_ema_kernel, device):
        raise RuntimeError(f"ema_update_tensors_: the Triton kernel cannot run on {device.type} tensors here "
                           "(CUDA, or CPU with TRITON_INTERPRET=1 set before triton is imported); "
                           "use ema_update_tensors_reference_")
    tables, n_chunks, aligned = _chunk_tables(teacher_tensors, student_tensors, device)
    if n_chunks == 0:
        return
    coef, from_student = _lerp_coefficients(momentum)
    _ema_kernel[(n_chunks,)](
        *tables, coef, from_student,
        CHUNK=CHUNK, BLOCK=BLOCK, ALIGNED=aligned, num_warps=8, enable_fp_fusion=False,
    )


@torch.no_grad()
def ema_update_tensors_reference_(teacher_tensors: list[torch.Tensor], student_tensors: list[torch.Tensor],
                                  momentum: float) -> None:
    """PyTorch twin of `ema_update_tensors_` with torch._foreach_lerp_.

    Pairs of different dtypes are lerped in fp32 and rounded once into the teacher, as the
    kernel does (torch.lerp wants one dtype).
    """
    _check(teacher_tensors, student_tensors)
    weight = 1.0 - momentum
    same = [(t, s) for t, s in zip(teacher_tensors, student_tensors) if t.dtype == s.dtype]
    mixed = [(t, s) for t, s in zip(teacher_tensors, student_tensors) if t.dtype != s.dtype]
    if same:
        torch._foreach_lerp_([t for t, _ in same], [s for _, s in same], weight)
    if mixed:
        teachers32 = [t.float() for t, _ in mixed]
        torch._foreach_lerp_(teachers32, [s.float() for _, s in mixed], weight)
        for (t, _), t32 in zip(mixed, teachers32):
            t.copy_(t32)
