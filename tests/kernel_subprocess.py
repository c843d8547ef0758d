"""Checks the Triton kernel tests run in a child process.

Triton fixes interpreter mode when `triton.language` is first imported, so a kernel
test module imported after another module imported triton compiled cannot interpret
its kernels; and the interpreter accepts programs the GPU compiler rejects.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_compiles_for_h100(script: str) -> None:
    """Runs `script` (which compiles kernels to sm_90 and prints "compiled") with triton not interpreted."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


def assert_passes_under_interpreter(test_file: str) -> None:
    """Re-runs `test_file` in a process that switches the interpreter on before importing triton."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file], cwd=REPO_ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def import_kernel_module(name: str):
    """fastdino_kernels.<name>, interpreted by Triton where no GPU compiles it (when this is the
    first import of triton in the process; assert_passes_under_interpreter covers the other case)."""
    if torch.cuda.is_available():
        return importlib.import_module(f"fastdino_kernels.{name}")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module(f"fastdino_kernels.{name}")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def kernel_devices(kernel) -> tuple[bool, bool, list]:
    """(runs interpreted on the CPU in this process, runs compiled on CUDA, the pytest params
    "cpu" and "cuda" skipped where `kernel` does not run)."""
    from fastdino_kernels import use_triton

    on_cpu = use_triton(kernel, torch.device("cpu"))
    on_cuda = torch.cuda.is_available() and use_triton(kernel, torch.device("cuda"))
    devices = [
        pytest.param("cpu", marks=pytest.mark.skipif(
            not on_cpu, reason="kernels compiled, not interpreted, in this process "
            "(without a GPU, test_cpu_cases_in_a_fresh_interpreter runs these)")),
        pytest.param("cuda", marks=pytest.mark.skipif(not on_cuda, reason="needs a CUDA GPU and compiled triton")),
    ]
    return on_cpu, on_cuda, devices
