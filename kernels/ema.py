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
offsets (64-bit address arithmetic out of the loop); whole tiles go without a mask and, where
every tensor starts on 16 bytes (separate allocations always do; views into DeepSpeed's flat
buffers may not, and the launcher checks), with 16-byte vector loads and stores.

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

from fastdino_kernels import use_triton

CHUNK = 16384  # elements per program
BLOCK = 2048  # elements per loop step: 8 warps x 32 threads x 8
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_TABLE_CACHE_SIZE = 8


@triton.jit
def _lerp_tile(t_addr, s_addr, offs, mask, other, t_bf16, s_bf16, coef, base_is_student, ALIGNED: tl.constexpr):
    """t[offs] <- fma(coef, s - t, s or t) in fp32, rounded once into t's dtype (see the module docstring)."""
    t16 = t_addr.to(tl.pointer_type(tl.bfloat16))
    t32 = t_addr.to(tl.pointer_type(tl.float32))
    s16 = s_addr.to(tl.pointer_type(tl.bfloat16))
    s32 = s_addr.to(tl.pointer_type(tl.float32))
    if ALIGNED:  # the bases (not each element) are 16-byte aligned
        t16 = tl.multiple_of(t16, 16)
        t32 = tl.multiple_of(t32, 16)
        s16 = tl.multiple_of(s16, 16)
        s32 = tl.multiple_of(s32, 16)
    t16 += offs
    t32 += offs
    s16 += offs
    s32 += offs
    if t_bf16:
        t = tl.load(t16, mask=mask, other=other).to(tl.float32)
    else:
        t = tl.load(t32, mask=mask, other=other)
    if s_bf16:
        s = tl.load(s16, mask=mask, other=other).to(tl.float32)
    else:
        s = tl.load(s32, mask=mask, other=other)
    new = tl.fma(coef, s - t, tl.where(base_is_student, s, t))
    if t_bf16:
        tl.store(t16, new.to(tl.bfloat16), mask=mask)
    else:
        tl.store(t32, new, mask=mask)


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
    numel = tl.load(NUMELS + j)
    t_addr = tl.load(TEACHER_PTRS + j)
    s_addr = tl.load(STUDENT_PTRS + j)
    dtypes = tl.load(DTYPES + j)
    base_is_student = from_student != 0
    t_bf16 = (dtypes & 1) != 0
    s_bf16 = (dtypes & 2) != 0
    # Addresses move to the chunk's first element once; the loop then runs on int32 offsets from 0,
    # which keeps 64-bit address arithmetic out of it (32 registers instead of 64-72 on sm_90).
    t_addr += start * tl.where(t_bf16, 2, 4)
    s_addr += start * tl.where(s_bf16, 2, 4)
    if ALIGNED:  # every tensor starts on 16 bytes (checked by the launcher): 16-byte vector accesses
        t_addr = tl.multiple_of(t_addr, 16)
        s_addr = tl.multiple_of(s_addr, 16)
    end = (tl.minimum(start + CHUNK, numel) - start).to(tl.int32)
    # Whole tiles without a mask (an element-granular mask would keep accesses scalar), then the tail.
    full = end // BLOCK * BLOCK
    for off in range(0, full, BLOCK):
        _lerp_tile(t_addr, s_addr, off + tl.arange(0, BLOCK), None, None, t_bf16, s_bf16, coef, base_is_student, ALIGNED)
    if full < end:
        offs = full + tl.arange(0, BLOCK)
        _lerp_tile(t_addr, s_addr, offs, offs < end, 0.0, t_bf16, s_bf16, coef, base_is_student, ALIGNED)


_tables: dict[tuple, tuple[tuple[torch.Tensor, ...], int]] = {}


def _chunk_tables(teachers: list[torch.Tensor], students: list[torch.Tensor],
                  device: torch.device) -> tuple[tuple[torch.Tensor, ...], int]:
    """(pointer, size, dtype, chunk-tensor, chunk-start tables on `device`, number of chunks), cached."""
    key = (device, tuple((t.data_ptr(), s.data_ptr(), t.numel(), t.dtype, s.dtype) for t, s in zip(teachers, students)))
    if key in _tables:
        return _tables[key]
    chunk_tensor, chunk_start = [], []
    for j, t in enumerate(teachers):
        starts = range(0, t.numel(), CHUNK)
        chunk_tensor += [j] * len(starts)
        chunk_start += starts
    rows = [[t.data_ptr() for t in teachers], [s.data_ptr() for s in students], [t.numel() for t in teachers],
            [_DTYPE_CODES[t.dtype] | _DTYPE_CODES[s.dtype] << 1 for t, s in zip(teachers, students)],
            chunk_tensor, chunk_start]
    # One host-to-device copy; a trailing 0 keeps every table a valid pointer even where its row is
    # empty (then there are no chunks, and no launch).
    flat = torch.tensor(sum(rows, []) + [0], dtype=torch.int64).to(device)
    tables, offset = [], 0
    for row in rows:
        tables.append(flat[offset:offset + max(len(row), 1)])
        offset += len(row)
    if len(_tables) >= _TABLE_CACHE_SIZE:
        _tables.pop(next(iter(_tables)))
    _tables[key] = (tuple(tables), len(chunk_tensor))
    return _tables[key]


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
    tables, n_chunks = _chunk_tables(teacher_tensors, student_tensors, device)
    if n_chunks == 0:
        return
    coef, from_student = _lerp_coefficients(momentum)
    # Views into flat buffers (DeepSpeed's) may start anywhere; separate allocations start on 256 bytes.
    aligned = all(t.data_ptr() % 16 == 0 for t in (*teacher_tensors, *student_tensors))
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
