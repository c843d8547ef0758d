"""The one place that applies parallelism and the other wrappers to the student, in a fixed order.

build_student_teacher(cfg.model) -> (move to device) -> apply_parallelism():
  0. batch norm in the head (model.use_bn_in_head) becomes SyncBatchNorm on GPUs when
     there are several ranks, in student and teacher, as the official code does;
  1. activation checkpointing of the student's blocks (recompute in the backward);
  2. torch.compile of every block, student and teacher (`compile_blocks`); neither 1 nor 2
     changes parameter names or state_dict keys, so what follows sees the plain model;
  3. parameter groups (weight decay split, last layer on its own) and DINOAdamW;
  4. one process and zero_stage 0: the plain module and optimizer (no DeepSpeed);
     otherwise: a DeepSpeed engine (ZeRO stage 0, 1 or 2) around the student and that
     optimizer;
  5. under ZeRO 1/2: tell the optimizer where each parameter lies in this rank's flat
     gradient partition (for per-parameter clipping), through `ZeroPartitions`, the one
     reader of ZeRO's private fields (checked against the DeepSpeed versions tested);
  6. DeepSpeed reads and writes its checkpoint files through `SafeCheckpointEngine`:
     its own engine unpickles them with `weights_only=False`, which runs any code a
     planted file holds.
The runner that comes out (`LocalStudent` or `DeepSpeedStudent`) is all the trainer sees of
parallelism: it runs the forward, backward and optimizer step, and saves, loads and
describes its own checkpoint layout.

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
from fastdino.ssl.meta_arch import compile_blocks
from fastdino.train import checkpoint as ckpt

# What DeepSpeed's ZeRO 0-2 shard files pickle besides tensors and plain values (found by saving
# checkpoints of every stage and listing torch.serialization.get_unsafe_globals_in_checkpoint): the
# only classes the safe loaders let through, for the shards and for a resume's pre-check.
SHARD_PICKLED_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                         "deepspeed.runtime.zero.config.ZeroStageEnum",
                         "deepspeed.utils.tensor_fragment.fragment_address")

logger = logging.getLogger(__name__)


def uses_deepspeed(zero_stage: int, world_size: int) -> bool:
    return world_size > 1 or zero_stage > 0


class LocalStudent:
    """One process, zero_stage 0: the student and its optimizer as they are. Its checkpoint is one
    step file holding the optimizer state too (fastdino.train.checkpoint.save_checkpoint)."""

    uses_deepspeed = False

    def __init__(self, module: nn.Module, optimizer: DINOAdamW, zero_stage: int = 0, world_size: int = 1):
        self.module, self.optimizer, self.zero_stage, self.world_size = module, optimizer, zero_stage, world_size

    @property
    def layout(self) -> dict:
        """What a checkpoint of this runner can only be resumed with."""
        return {"world_size": self.world_size, "zero_stage": self.zero_stage}

    def describe(self) -> str:
        return "one process, plain module" if not self.uses_deepspeed else \
            f"DeepSpeed ZeRO stage {self.zero_stage} over {self.world_size} rank(s)"

    def check_checkpoint_fits(self, path: Path, state: dict) -> None:
        """Raises CheckpointError unless `path` (with its payload `state`) was written by a runner
        of this kind and layout."""
        sharded = path.is_dir()
        if sharded != self.uses_deepspeed:
            written = "a DeepSpeed run (a step folder)" if sharded else "a one-process run (a step file)"
            raise ckpt.CheckpointError(f"checkpoint {path} was written by {written}; resume it with the same "
                                       f"launch, world size and parallel.zero_stage")
        layout = state.get("parallel", {"world_size": 1, "zero_stage": 0})
        if sharded and layout != self.layout:
            raise ckpt.CheckpointError(f"checkpoint {path} was written with world size {layout['world_size']} and "
                                       f"ZeRO stage {layout['zero_stage']}; this run has {self.world_size} and "
                                       f"{self.zero_stage}: resume with the same")

    def save(self, checkpoint_dir: Path, step: int, payload: dict, keep: int, rank: int, barrier) -> Path:
        """Writes the checkpoint of `step` (payload: what the trainer keeps besides the optimizer)."""
        return ckpt.save_checkpoint(checkpoint_dir, step, {**payload, "optimizer": self.optimizer.state_dict()}, keep)

    def load(self, path: Path, state: dict, rank: int) -> dict:
        """Loads the student and optimizer from the checkpoint at `path` (payload `state`); returns
        this rank's saved RNG state."""
        self.module.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["rng"]

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

    def __init__(self, engine, optimizer: DINOAdamW, zero_stage: int, world_size: int):
        super().__init__(engine.module, optimizer, zero_stage, world_size)
        self.engine = engine

    def save(self, checkpoint_dir: Path, step: int, payload: dict, keep: int, rank: int, barrier) -> Path:
        """Collective: every rank calls it at the same step. A step folder of DeepSpeed's shards
        (fastdino.train.checkpoint.save_sharded_checkpoint)."""
        def write_shards(folder: Path, tag: str) -> None:
            self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)

        return ckpt.save_sharded_checkpoint(checkpoint_dir, step, write_shards, {**payload, "parallel": self.layout},
                                            keep, rank, barrier)

    def load(self, path: Path, state: dict, rank: int) -> dict:
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError("DeepSpeed found no checkpoint files in it")
        return ckpt.load_sharded_rank_state(path, rank)["rng"]

    def master_partition(self) -> list[torch.Tensor]:
        """ZeRO's fp32 master copy of this rank's partition (none at stage 0)."""
        return ZeroPartitions(self.engine.optimizer).fp32_partitions() if self.zero_stage > 0 else []

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
               for module, _, name in (qualified.rpartition(".") for qualified in SHARD_PICKLED_CLASSES)]

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


class ZeroPartitions:
    """The one reader of DeepSpeed ZeRO 1/2's private fields (DeepSpeedZeroOptimizer: the flat
    bit16 groups, each rank's partition of them, the fp32 master partitions). They are not an API,
    so the fields are checked on construction and a DeepSpeed version outside the tested range
    is named in the error (or in a warning, when the fields are there)."""

    TESTED = ((0, 16), (0, 19))  # (major, minor) range tested with fastdino
    FIELDS = ("bit16_groups", "bit16_groups_flat", "parallel_partitioned_bit16_groups",
              "single_partition_of_fp32_groups", "real_dp_process_group")

    def __init__(self, zero_optimizer):
        import deepspeed

        version = tuple(int(part) for part in deepspeed.__version__.split(".")[:2] if part.isdigit())
        tested = self.TESTED[0] <= version <= self.TESTED[1]
        missing = [f for f in self.FIELDS if not hasattr(zero_optimizer, f)]
        if missing:
            raise RuntimeError(f"DeepSpeed {deepspeed.__version__}'s ZeRO optimizer lacks {', '.join(missing)}, "
                               f"which per-parameter clipping reads (tested: "
                               f"{'.'.join(map(str, self.TESTED[0]))} to {'.'.join(map(str, self.TESTED[1]))}.x)")
        if not tested:
            logger.warning("DeepSpeed %s is outside the versions tested with fastdino's ZeRO wiring (%s to %s.x)",
                           deepspeed.__version__, ".".join(map(str, self.TESTED[0])), ".".join(map(str, self.TESTED[1])))
        self.zero = zero_optimizer

    def fragments(self) -> dict[int, PartitionFragments]:
        """id(fp32 partition of group i) -> where that group's parameters lie in this rank's flat
        gradient partition (what DINOAdamW's per-parameter clipping needs)."""
        zero, fragments = self.zero, {}
        for i, params in enumerate(zero.bit16_groups):
            group = zero.real_dp_process_group[i]
            partition = zero.parallel_partitioned_bit16_groups[i][torch.distributed.get_rank(group)]
            fragments[id(zero.single_partition_of_fp32_groups[i])] = PartitionFragments(
                params, zero.bit16_groups_flat[i], partition, group)
        return fragments

    def fp32_partitions(self) -> list[torch.Tensor]:
        return list(self.zero.single_partition_of_fp32_groups)


def apply_parallelism(student: nn.Module, teacher: nn.Module, env: DistEnv, *, zero_stage: int = 0,
                      micro_batch: int, bucket_elements: int, betas: tuple[float, float], clip_grad: float,
                      activation_checkpointing: bool = False, compile: bool = False
                      ) -> tuple[LocalStudent, nn.Module]:
    """(the student as the training loop drives it, the teacher), the wrappers applied in the
    order of the module docstring. `student`/`teacher`: MultiCropWrapper on their device;
    `micro_batch`: images per rank per step (DeepSpeed's train_micro_batch_size_per_gpu);
    `bucket_elements`: ZeRO's reduce/all-gather bucket size; `betas`, `clip_grad`: DINOAdamW's.
    Raises MissingPackageError when DeepSpeed is needed and not installed."""
    if env.world_size > 1 and has_batchnorm(student):
        if next(student.parameters()).device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        elif env.is_main:  # torch's SyncBatchNorm runs on GPUs only
            logger.warning("batch norm in the head uses per-rank batch statistics on CPU (SyncBatchNorm needs GPUs)")
    student.backbone.set_activation_checkpointing(activation_checkpointing)
    if compile:
        for net in (student, teacher):
            compile_blocks(net.backbone)
    optimizer = DINOAdamW(param_groups(student), lr=0.0, betas=tuple(betas), clip_grad=clip_grad)
    stage = zero_stage
    if not uses_deepspeed(stage, env.world_size):
        return LocalStudent(student, optimizer), teacher
    require_deepspeed(f"parallel.zero_stage={stage} on {env.world_size} rank(s)")
    use_cpu_accelerator_for_deepspeed()
    import deepspeed

    ds_config = deepspeed_config(stage, micro_batch, env.world_size, bucket_elements)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    engine.checkpoint_engine = safe_checkpoint_engine()
    if stage > 0:
        optimizer.partition_fragments.update(ZeroPartitions(engine.optimizer).fragments())
    if env.is_main:
        logger.info("DeepSpeed %s: ZeRO stage %d over %d rank(s), fp32 optimizer%s", deepspeed.__version__, stage,
                    env.world_size, ", partitioned optimizer state" + (" and gradients" if stage == 2 else "")
                    if stage else "")
    return DeepSpeedStudent(engine, optimizer, stage, env.world_size), teacher


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_bytes(student: LocalStudent) -> dict:
    """What this rank holds for the student, in bytes: parameters (full on every rank under
    stages 0-2), AdamW moments (exp_avg + exp_avg_sq; created at the first step) and ZeRO's fp32
    master partition (none on the plain and stage-0 paths, where the module weights are the master)."""
    optimizer = student.optimizer
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq") if key in state]
    master = student.master_partition() if student.uses_deepspeed else []
    return {"params": _tensor_bytes(student.module.parameters()),
            "trainable_params": _tensor_bytes(p for p in student.module.parameters() if p.requires_grad),
            "optimizer_state": _tensor_bytes(moments), "master_params": _tensor_bytes(master)}
