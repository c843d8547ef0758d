"""The one place that applies parallelism to the student, in a fixed order.

build_student_teacher(cfg.model) -> (move to device) -> apply_parallelism():
  0. batch norm in the head (model.use_bn_in_head) becomes SyncBatchNorm on GPUs when
     there are several ranks, in student and teacher, as the official code does;
  1. parameter groups (weight decay split, last layer on its own) and DINOAdamW;
  2. one process and zero_stage 0: the plain module and optimizer (no DeepSpeed);
     otherwise: a DeepSpeed engine (ZeRO stage 0, 1 or 2 from parallel.zero_stage)
     around the student and that optimizer;
  3. under ZeRO 1/2: tell the optimizer where each parameter lies in this rank's
     flat gradient partition (for per-parameter clipping);
  4. DeepSpeed reads and writes its checkpoint files through `SafeCheckpointEngine`:
     its own engine unpickles them with `weights_only=False`, which runs any code a
     planted file holds.

Numerics are the same on every path: the module keeps fp32 weights (on CUDA the
forward runs under bf16 autocast, as on one GPU), DeepSpeed runs its fp32
optimizer path, so ZeRO's master partition is fp32 and, after each step, its
all-gather leaves the current fp32 weights in the module, where the teacher's EMA
reads them. The teacher is never wrapped: every rank holds the same copy.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

from fastdino._requires import require_deepspeed
from fastdino.parallel.distributed import DistEnv, use_cpu_accelerator_for_deepspeed
from fastdino.parallel.optim import DINOAdamW, PartitionFragments
from fastdino.ssl import param_groups
from fastdino.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def uses_deepspeed(zero_stage: int, world_size: int) -> bool:
    return world_size > 1 or zero_stage > 0


class LocalStudent:
    """One process, zero_stage 0: the student and its optimizer as they are."""

    uses_deepspeed = False

    def __init__(self, module: nn.Module, optimizer: DINOAdamW, zero_stage: int = 0):
        self.module, self.optimizer, self.zero_stage = module, optimizer, zero_stage

    def __call__(self, crops):
        return self.module(crops)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups


class DeepSpeedStudent(LocalStudent):
    """The student inside a DeepSpeed engine: gradients averaged over ranks, ZeRO sharding."""

    uses_deepspeed = True

    def __init__(self, engine, optimizer: DINOAdamW, zero_stage: int):
        super().__init__(engine.module, optimizer, zero_stage)
        self.engine = engine

    def __call__(self, crops):
        return self.engine(crops)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # clears the gradients too

    def zero_grad(self) -> None:
        self.engine.zero_grad()


def deepspeed_config(zero_stage: int, micro_batch: int, world_size: int, bucket_elements: int) -> dict:
    """The DeepSpeed settings fastdino needs. Clipping, schedules and precision stay with fastdino
    (per-parameter clipping in DINOAdamW, per-step lr/wd on the param groups, bf16 autocast)."""
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": zero_stage},
    }
    if zero_stage > 0:
        config["zero_optimization"].update(reduce_bucket_size=bucket_elements, allgather_bucket_size=bucket_elements,
                                           overlap_comm=False, contiguous_gradients=True)
    return config


def safe_checkpoint_engine():
    """A DeepSpeed checkpoint engine that never runs pickled code (see `SafeCheckpointEngine`)."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    allowed = [getattr(importlib.import_module(module), name)
               for module, _, name in (qualified.rpartition(".") for qualified in ckpt.DEEPSPEED_GLOBALS)]

    class SafeCheckpointEngine(CheckpointEngine):
        """DeepSpeed's plain torch.save / torch.load engine, except that it loads with
        `weights_only=True`, allowing only the DeepSpeed classes its ZeRO files hold (a file
        pickling any other is a one-line CheckpointError naming the class), refuses non-finite
        tensors, and reports a full disk as one line (fastdino.train.checkpoint does all three)."""

        def __init__(self):
            super().__init__()
            self.name = "fastdino.SafeCheckpointEngine"

        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            ckpt.write_torch_file(state_dict, Path(path))

        def load(self, path: str, map_location=None):
            state = ckpt.torch_load_safely(Path(path), map_location, allowed=allowed, checkpoint=True)
            ckpt.check_finite(state, path)
            return state

        def commit(self, info):
            return True

    return SafeCheckpointEngine()


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def apply_parallelism(student: nn.Module, teacher: nn.Module, cfg, env: DistEnv) -> tuple[LocalStudent, nn.Module]:
    """(the student as the training loop drives it, the teacher), in the order of the module docstring."""
    if env.world_size > 1 and has_batchnorm(student):
        if next(student.parameters()).device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        elif env.is_main:  # torch's SyncBatchNorm runs on GPUs only
            logger.warning("batch norm in the head uses per-rank batch statistics on CPU (SyncBatchNorm needs GPUs)")
    optimizer = DINOAdamW(param_groups(student), lr=0.0, betas=tuple(cfg.optim.betas),
                          clip_grad=cfg.optim.clip_grad)
    stage = cfg.parallel.zero_stage
    if not uses_deepspeed(stage, env.world_size):
        return LocalStudent(student, optimizer), teacher
    require_deepspeed(f"parallel.zero_stage={stage} on {env.world_size} rank(s)")
    use_cpu_accelerator_for_deepspeed()
    import deepspeed

    ds_config = deepspeed_config(stage, cfg.data.batch_size, env.world_size, cfg.parallel.bucket_elements)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    engine.checkpoint_engine = safe_checkpoint_engine()
    if stage > 0:
        zero = engine.optimizer
        for i, params in enumerate(zero.bit16_groups):
            group = zero.real_dp_process_group[i]
            partition = zero.parallel_partitioned_bit16_groups[i][torch.distributed.get_rank(group)]
            optimizer.partition_fragments[id(zero.single_partition_of_fp32_groups[i])] = PartitionFragments(
                params, zero.bit16_groups_flat[i], partition, group)
    if env.is_main:
        logger.info("DeepSpeed %s: ZeRO stage %d over %d rank(s), fp32 optimizer%s", deepspeed.__version__, stage,
                    env.world_size, ", partitioned optimizer state" + (" and gradients" if stage == 2 else "")
                    if stage else "")
    return DeepSpeedStudent(engine, optimizer, stage), teacher


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_bytes(student: LocalStudent) -> dict:
    """What this rank holds for the student, in bytes: parameters (full on every rank under
    stages 0-2), AdamW moments (exp_avg + exp_avg_sq; created at the first step) and ZeRO's fp32
    master partition (none on the plain and stage-0 paths, where the module weights are the master)."""
    optimizer = student.optimizer
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq") if key in state]
    master = []
    if student.uses_deepspeed and student.zero_stage > 0:
        master = list(student.engine.optimizer.single_partition_of_fp32_groups)
    return {"params": _tensor_bytes(student.module.parameters()),
            "trainable_params": _tensor_bytes(p for p in student.module.parameters() if p.requires_grad),
            "optimizer_state": _tensor_bytes(moments), "master_params": _tensor_bytes(master)}
