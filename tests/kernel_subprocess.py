"""Checks the Triton kernel tests run in a child process.

Triton fixes interpreter mode when `triton.language` is first imported, so a kernel
test module imported after another module imported triton compiled cannot interpret
its kernels; and the interpreter accepts programs the GPU compiler rejects.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
