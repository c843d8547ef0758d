"""Keep FFCV from changing PyTorch's thread count.

FFCV's `Compiler.set_num_threads(n)` sets numba's decode threads and also calls
`torch.set_num_threads(n)`, a process-wide side effect: importing FFCV drops torch
to one intra-op thread and every loader resets it to its worker count, which
halved CPU training speed here. This keeps the numba half only. Import it before
any FFCV loader is built.
"""
import os
from multiprocessing import cpu_count

import numba
import torch
from ffcv.pipeline.compiler import Compiler

# What torch would have picked had FFCV not been imported (it may already have been).
_TORCH_THREADS = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def _set_decode_threads(cls, n: int) -> None:
    cls.num_threads = n if n >= 1 else cpu_count()
    numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))


Compiler.set_num_threads = classmethod(_set_decode_threads)
# ffcv.pipeline.compiler already ran set_num_threads(1) at import: undo its torch half.
if torch.get_num_threads() != _TORCH_THREADS:
    torch.set_num_threads(_TORCH_THREADS)
