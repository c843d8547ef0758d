"""Process group set-up from the launcher's environment.

torchrun, the `deepspeed` launcher and `srun ... torchrun` all export RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; this module reads them and
joins the group: gloo on CPU, nccl on CUDA. Every collective gets a timeout, so a
rank that dies makes the others fail with an error instead of waiting forever
(torchrun's agent then stops the whole job with a non-zero exit).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastdino._requires import require_deepspeed


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env() -> DistEnv:
    """(rank, world size, local rank) as the launcher set them; (0, 1, 0) for a plain `python` run."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise RuntimeError(f"RANK/WORLD_SIZE/LOCAL_RANK from the launcher are not integers ({exc})") from None
    if not 0 <= rank < world_size:
        raise RuntimeError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size}): check the launcher settings")
    return DistEnv(rank, world_size, local_rank)


def use_cpu_accelerator_for_deepspeed() -> None:
    """DeepSpeed picks its accelerator once, at import; without a GPU it must be the CPU one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, timeout_s: float, need_group: bool) -> DistEnv:
    """Joins the process group when the launcher started several ranks, or when `need_group`
    (DeepSpeed on one rank). The group is DeepSpeed's (deepspeed.comm over torch.distributed)."""
    env = launcher_env()
    if env.world_size == 1 and not need_group:
        return env
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        if env.world_size == 1:  # a one-rank group for DeepSpeed under a plain `python` run
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        require_deepspeed(f"training on {env.world_size} ranks" if env.world_size > 1 else "parallel.zero_stage > 0")
        use_cpu_accelerator_for_deepspeed()
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False, timeout=timedelta(seconds=timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), env.local_rank)


def init_from_launcher(device: torch.device) -> tuple[int, int]:
    """(rank, world size) for the evaluation commands: under torchrun (WORLD_SIZE > 1) joins a plain
    torch.distributed group (nccl on CUDA, gloo on CPU), otherwise (0, 1) and no group."""
    env = launcher_env()
    if env.world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
