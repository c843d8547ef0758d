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
