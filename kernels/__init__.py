"""Fused Triton kernels of fastdino, installed as ``fastdino_kernels``.

- ``fastdino_kernels.dino_loss``: DINO cross-entropy over all (teacher view, student crop)
  pairs, forward and backward, plus the teacher column sums for the centre update.
- ``fastdino_kernels.ema``: teacher <- m * teacher + (1 - m) * student over a whole
  parameter list in one launch.
- ``fastdino_kernels.clip``: tensors[i] *= scales[i] over a whole gradient list in one launch
  (DINO's per-parameter clipping without a kernel per parameter).

Each public function has a plain PyTorch twin with the same signature (``*_reference``).
"""
from __future__ import annotations

import torch


def use_triton(kernel, device: torch.device) -> bool:
    """Whether `kernel` runs on tensors of `device`.

    Triton decides, when a function is decorated with ``@triton.jit``, whether it is compiled
    for the GPU or interpreted on the CPU (``TRITON_INTERPRET=1`` at that moment): compiled
    kernels take CUDA tensors, interpreted ones CPU tensors. A kernel whose mode differs from
    that of ``triton.language``'s own jit functions (decorated at its first import) cannot
    run at all. Wherever this is False the PyTorch twin runs.
    """
    import triton.language as tl

    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if interpreted != (type(tl.zeros).__name__ == "InterpretedFunction"):
        return False
    return device.type == ("cpu" if interpreted else "cuda")


class PointerTables:
    """Device tables of a multi-tensor kernel's tensor list, built once per list and cached: the
    kernels (ema, clip) run one program per (tensor, first element) chunk and read the tensors'
    data pointers, sizes and dtype codes from these tables. The tables depend only on addresses
    and sizes, which stay the same from step to step (parameters, or gradients that return to
    the same memory), so the host-to-device copy happens once per list, not per launch."""

    def __init__(self, chunk: int, cache_size: int):
        self.chunk, self.cache_size = chunk, cache_size
        self._cache: dict[tuple, tuple[tuple[torch.Tensor, ...], int, bool]] = {}

    def get(self, key: tuple, numels: list[int], columns: list[list[int]], device: torch.device,
            pointer_columns: int) -> tuple[tuple[torch.Tensor, ...], int, bool]:
        """(the int64 tables on `device`: each of `columns` (one value per tensor), then the chunk
        tensor and chunk start tables; the number of chunks; whether every address in the first
        `pointer_columns` columns is 16-byte aligned: separate allocations are, views into a flat
        buffer (ZeRO's) may not be). `key` identifies the list (its addresses, sizes and dtypes);
        `numels` are the tensors' sizes."""
        if key in self._cache:
            return self._cache[key]
        chunk_tensor, chunk_start = [], []
        for j, numel in enumerate(numels):
            starts = range(0, numel, self.chunk)
            chunk_tensor += [j] * len(starts)
            chunk_start += starts
        rows = [*columns, chunk_tensor, chunk_start]
        # One host-to-device copy, from pinned memory on CUDA so that it does not wait for the device
        # (the host allocator keeps the block until the copy is done); a trailing 0 keeps every table
        # a valid pointer even where its row is empty (then there are no chunks, and no launch).
        host = torch.tensor(sum(rows, []) + [0], dtype=torch.int64, pin_memory=device.type == "cuda")
        flat = host.to(device, non_blocking=True)
        tables, offset = [], 0
        for row in rows:
            tables.append(flat[offset:offset + max(len(row), 1)])
            offset += len(row)
        if len(self._cache) >= self.cache_size:
            self._cache.pop(next(iter(self._cache)))
        aligned = all(address % 16 == 0 for column in columns[:pointer_columns] for address in column)
        self._cache[key] = (tuple(tables), len(chunk_tensor), aligned)
        return self._cache[key]
