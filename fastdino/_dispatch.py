"""Choosing between a fused Triton path and its plain PyTorch twin.

`auto` takes Triton where it runs compiled (CUDA tensors) and the twin elsewhere,
logging once why it chose what it chose. The Triton interpreter (TRITON_INTERPRET=1)
runs the kernels on CPU tensors, for tests, but far slower than the twin: it is used
only when `triton` is asked for by name, so a stray variable cannot slow a CPU run
down. Asking for `triton` where it cannot run is an error, never a silent fallback.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

_logged: set[tuple[str, str, str]] = set()


def triton_runnable(kernel, device: torch.device) -> tuple[bool, str]:
    """Whether the Triton `kernel` runs on `device` tensors here, and why (one clause, no trailing period)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    from fastdino_kernels import use_triton

    if use_triton(kernel, device):
        return True, ("CUDA tensors" if device.type == "cuda" else "TRITON_INTERPRET=1 interprets Triton on the CPU")
    if device.type == "cuda":
        return False, "triton was imported in interpreter mode (TRITON_INTERPRET=1), which takes CPU tensors only"
    return False, (f"tensors are on {device.type}, and Triton compiles for GPUs only; to run it on the CPU "
                   "(slowly, for tests) set TRITON_INTERPRET=1 before starting")


def resolve_impl(op: str, impl: str, kernel, device: torch.device, logger: logging.Logger) -> str:
    """Returns 'triton' or 'torch' for `op` (whose Triton kernel is `kernel`) on `device`.

    Raises ValueError for an unknown `impl`, RuntimeError for impl='triton' where it cannot run.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"{op}: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    runnable, why = triton_runnable(kernel, device)
    if impl == "triton" and not runnable:
        raise RuntimeError(f"{op}: impl='triton' cannot run here: {why}")
    if impl == "auto" and runnable and device.type != "cuda":
        runnable, why = False, "the Triton interpreter is for tests, the PyTorch twin is faster on the CPU"
    chosen = "triton" if impl == "triton" or (impl == "auto" and runnable) else "torch"
    key = (op, impl, f"{device.type}:{chosen}")
    if key not in _logged:
        _logged.add(key)
        reason = why if impl == "auto" else "asked for by name"
        logger.info("%s: using the %s implementation (%s)", op, chosen, reason)
    return chosen
