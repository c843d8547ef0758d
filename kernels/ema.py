"""Teacher EMA, teacher <- m * teacher + (1 - m) * student, over a whole parameter list in
one Triton launch (plus, optionally, the DINO centre with its own momentum).

Multi-tensor design: the kernel gets a table of the tensors' data pointers, sizes and dtypes
and a table of (tensor, first element) chunks, one program per chunk. The teacher and the
student are separate nn.Modules whose parameters are separate allocations (and DeepSpeed
owns its own flat buffers), so flattening them into one buffer would mean re-plumbing every
parameter as a view; a pointer table works on any list of contiguous tensors, flat buffers
included. The tables depend only on the addresses and sizes, which do not change between
steps, so they are built and copied to the device once and cached.

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
def _ema_kernel(
    TEACHER_PTRS,  # [n_tensors] int64: data pointer of each teacher tensor
    STUDENT_PTRS,  # [n_tensors] int64: data pointer of each student tensor
    NUMELS,  # [n_tensors] int64
    DTYPES,  # [n_tensors] int64: bit 0 set if the teacher is bf16, bit 1 the student (else fp32)
    CHUNK_TENSOR,  # [n_chunks] int64: tensor of each chunk
    CHUNK_START,  # [n_chunks] int64: first element of each chunk
    n_chunks,  # programs past n_chunks update the centre
    center_ptr,  # data pointer of the fp32 centre (0 without one)
    center_new_ptr,  # data pointer of the fp32 batch centre it moves towards
    center_numel,
    coef,  # fp32 lerp coefficient of the tensor list: w if w < 0.5 else w - 1
    from_student,  # 0: base is the teacher (w < 0.5), 1: base is the student
    center_coef,
    center_from_student,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    listed = pid < n_chunks
    j = tl.load(CHUNK_TENSOR + pid, mask=listed, other=0)
    start = tl.where(listed, tl.load(CHUNK_START + pid, mask=listed, other=0), (pid - n_chunks).to(tl.int64) * CHUNK)
    numel = tl.where(listed, tl.load(NUMELS + j, mask=listed, other=0), center_numel)
    t_addr = tl.where(listed, tl.load(TEACHER_PTRS + j, mask=listed, other=0), center_ptr)
    s_addr = tl.where(listed, tl.load(STUDENT_PTRS + j, mask=listed, other=0), center_new_ptr)
    dtypes = tl.where(listed, tl.load(DTYPES + j, mask=listed, other=0), 0)
    w = tl.where(listed, coef, center_coef)
    base_is_student = tl.where(listed, from_student, center_from_student) != 0
    t_bf16 = (dtypes & 1) != 0
    s_bf16 = (dtypes & 2) != 0
    end = tl.minimum(start + CHUNK, numel)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < end
        if t_bf16:
            t = tl.load(t_addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            t = tl.load(t_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        if s_bf16:
            s = tl.load(s_addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(s_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
        new = tl.fma(w, s - t, tl.where(base_is_student, s, t))
        if t_bf16:
            tl.store(t_addr.to(tl.pointer_type(tl.bfloat16)) + offs, new.to(tl.bfloat16), mask=mask)
        else:
            tl.store(t_addr.to(tl.pointer_type(tl.float32)) + offs, new, mask=mask)


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
    # One host-to-device copy; a trailing 0 keeps every table a valid (if unread) pointer.
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


def _check(teachers: list[torch.Tensor], students: list[torch.Tensor], center, center_update) -> torch.device:
    if len(teachers) != len(students):
        raise ValueError(f"ema_update_tensors_: {len(teachers)} teacher tensors but {len(students)} student tensors")
    if (center is None) != (center_update is None):
        raise ValueError("ema_update_tensors_: give both center and center_update, or neither")
    pairs = list(zip(teachers, students))
    if center is not None:
        if center.dtype != torch.float32 or center_update.dtype != torch.float32:
            raise TypeError("ema_update_tensors_: the centre and its update must be fp32")
        pairs.append((center, center_update))
    if not pairs:
        return torch.device("cpu")
    device = pairs[0][0].device
    for t, s in pairs:
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
def ema_update_tensors_(teacher_tensors: list[torch.Tensor], student_tensors: list[torch.Tensor], momentum: float, *,
                        center: torch.Tensor | None = None, center_update: torch.Tensor | None = None,
                        center_momentum: float = 0.0) -> None:
    """In place, in one launch: t <- lerp(t, s, 1 - momentum) for every (t, s) pair, and
    center <- lerp(center, center_update, 1 - center_momentum) when a centre is given.

    Teachers and students are contiguous fp32 or bf16 (mixed freely); the arithmetic is fp32
    and rounds once into the teacher, bit-exact with torch.lerp for fp32 tensors.
    Raises where the Triton kernel cannot run (see `use_triton`): callers choose
    `ema_update_tensors_reference_` there, never by silent fallback.
    """
    device = _check(teacher_tensors, student_tensors, center, center_update)
    if not use_triton(_ema_kernel, device):
        raise RuntimeError(f"ema_update_tensors_: the Triton kernel cannot run on {device.type} tensors here "
                           "(CUDA, or CPU with TRITON_INTERPRET=1 set before triton is imported); "
                           "use ema_update_tensors_reference_")
    tables, n_chunks = _chunk_tables(teacher_tensors, student_tensors, device)
    center_numel = 0 if center is None else center.numel()
    n_programs = n_chunks + triton.cdiv(center_numel, CHUNK)
    if n_programs == 0:
        return
    coef, from_student = _lerp_coefficients(momentum)
    center_coef, center_from_student = _lerp_coefficients(center_momentum)
    _ema_kernel[(n_programs,)](
        *tables, n_chunks,
        0 if center is None else center.data_ptr(), 0 if center is None else center_update.data_ptr(), center_numel,
        coef, from_student, center_coef, center_from_student,
        CHUNK=CHUNK, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False,
    )


@torch.no_grad()
def ema_update_tensors_reference_(teacher_tensors: list[torch.Tensor], student_tensors: list[torch.Tensor],
                                  momentum: float, *, center: torch.Tensor | None = None,
                                  center_update: torch.Tensor | None = None, center_momentum: float = 0.0) -> None:
    """PyTorch twin of `ema_update_tensors_` with torch._foreach_lerp_.

    Pairs of different dtypes are lerped in fp32 and rounded once into the teacher, as the
    kernel does (torch.lerp wants one dtype).
    """
    _check(teacher_tensors, student_tensors, center, center_update)
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
    if center is not None:
        center.lerp_(center_update, 1.0 - center_momentum)
