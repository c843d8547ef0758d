"""Counting the aten ops a block of code runs, for the tests that hold launch and copy counts."""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside the block, by name without overload ("cat", "copy_", ...)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def only(self, names) -> dict:
        return {name: n for name, n in self.ops.items() if name in names}
