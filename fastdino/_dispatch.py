"""Choosing between a fused Triton path and its plain PyTorch twin.

`auto` takes Triton where it can run (CUDA tensors, or the Triton interpreter when
TRITON_INTERPRET=1) and logs once why it chose what it chose. Asking for
`triton` where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

_logged: set[tuple[str, str, str]] = set()


def triton_runnable(kernel, device: torch.device) -> tuple[bool, str]:
    """Whether the Triton `kernel` runs on `device` tensors here, and why."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    from fastdino_kernels import use_triton

    if use_triton(kernel, device):
        return True, ("CUDA tensors" if device.type == "cuda" else "TRITON_INTERPRET=1 interprets Triton on the CPU")
    return False, (f"tensors are on {device.type} and Triton compiles only for GPUs "
                   "(TRITON_INTERPRET=1, set before triton is imported, interprets it on the CPU)")


def resolve_impl(op: str, impl: str, kernel, device: torch.device, logger: logging.Logger) -> str:
    """Returns 'triton' or 'torch' for `op` (whose Triton kernel is `kernel`) on `device`."""
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"{op}: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    runnable, why = triton_runnable(kernel, device)
    if impl == "triton" and not runnable:
        raise RuntimeError(f"{op}: impl='triton' cannot run here: {why}")
    chosen = "triton" if impl == "triton" or (impl == "auto" and runnable) else "torch"
    key = (op, impl, f"{device.type}:{chosen}")
    if key not in _logged:
        _logged.add(key)
        reason = why if impl == "auto" else "asked for by name"
        logger.info("%s: using the %s implementation (%s)", op, chosen, reason)
    return chosen
