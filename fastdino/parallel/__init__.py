"""Data parallelism: process groups from the launcher, DeepSpeed ZeRO, the DINO optimizer."""
from fastdino.parallel.distributed import DistEnv, barrier, init_distributed, launcher_env, shutdown_distributed
from fastdino.parallel.engine import (SHARD_PICKLED_CLASSES, apply_parallelism, deepspeed_config, memory_bytes,
                                      uses_deepspeed)
from fastdino.parallel.optim import DINOAdamW

__all__ = ["DistEnv", "DINOAdamW", "SHARD_PICKLED_CLASSES", "apply_parallelism", "barrier", "deepspeed_config",
           "init_distributed", "launcher_env", "memory_bytes", "shutdown_distributed", "uses_deepspeed"]
