"""Atomic, resumable checkpoints that load with `torch.load(weights_only=True)`.

One process writes one file, `step_<step>.pt`: to a temporary file in the same
folder, flushed to disk, then renamed over its final name, so a crash mid-write
never leaves a file that looks complete. Checkpoints hold only tensors and plain
Python values.

A DeepSpeed run writes a folder, `step_<step>/`: DeepSpeed's sharded files (model
states, one ZeRO optimizer shard per rank), `rank_<r>.pt` (each rank's RNG state)
and `fastdino.pt` (a one-process checkpoint without the optimizer: student,
teacher, centre, step, k-NN history, config; what export and eval read). Every
rank writes into `.tmp-step_<step>/`; after a barrier rank 0 renames it to its
final name, so a folder named `step_<step>` is always complete, and a kill during
the write leaves only a `.tmp-` folder, which is ignored and cleared later.

Every file is read with `torch_load_safely`; backbones of every checkpoint kind
(these, official DINO files, exports) come from `fastdino.eval.export.read_backbone`.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARDED_PAYLOAD = "fastdino.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(checkpoint_dir: Path, step: int) -> Path:
    return checkpoint_dir / f"step_{step:08d}.pt"


def save_checkpoint(checkpoint_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Writes step_<step>.pt, then deletes all but the newest `keep` checkpoints."""
    path = checkpoint_path(checkpoint_dir, step)
    atomic_torch_save({"version": CHECKPOINT_VERSION, "step": step, "rng": rng_state(), **payload}, path)
    _prune(checkpoint_dir, keep)
    return path


def _discard(path: Path) -> None:
    """Renames first, then deletes: a kill half-way through never leaves a damaged checkpoint under
    a checkpoint's name."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def _prune(checkpoint_dir: Path, keep: int) -> None:
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        _discard(old)


def save_sharded_checkpoint(checkpoint_dir: Path, step: int, engine, payload: dict, keep: int, rank: int,
                            barrier) -> Path:
    """Called by every rank of a DeepSpeed run (see the module docstring). `payload` is used on rank 0."""
    final = checkpoint_dir / f"step_{step:08d}"
    tag = f".tmp-step_{step:08d}"
    staging = checkpoint_dir / tag
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False)
    atomic_torch_save({"rng": rng_state()}, staging / f"rank_{rank:05d}.pt")
    if rank == 0:
        atomic_torch_save({"version": CHECKPOINT_VERSION, "step": step, "rng": rng_state(), **payload},
                          staging / SHARDED_PAYLOAD)
    barrier()  # every rank's files are in place
    if rank == 0:
        if final.exists():
            _discard(final)
        os.replace(staging, final)
        _fsync_dir(checkpoint_dir)
        for stale in checkpoint_dir.glob(".tmp-step_*"):  # left by runs killed while writing
            shutil.rmtree(stale, ignore_errors=True)
        _prune(checkpoint_dir, keep)
    barrier()
    return final


def load_sharded_rank_state(path: Path, rank: int) -> dict:
    rank_file = Path(path) / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no state for rank {rank}: resume with the world size it was "
                              f"written with")
    return torch.load(rank_file, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int:
    match = _STEP_FILE.match(path.name) or _STEP_DIR.match(path.name)
    return int(match.group(1))


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: step files, and step folders (a folder only gets its
    name once it is complete; `.tmp-` folders of interrupted writes are not listed)."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir()
             if (_STEP_FILE.match(p.name) and p.is_file())
             or (_STEP_DIR.match(p.name) and (p / SHARDED_PAYLOAD).is_file())]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.is_dir()))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file `path` names: a file as it is; a DeepSpeed step folder's fastdino.pt; the
    newest complete checkpoint of a run folder (or of its checkpoints/ folder), which is logged.

    Raises CheckpointError when there is no such file, or the folder holds no checkpoint.
    """
    path = Path(path)
    if path.is_dir() and not (path / SHARDED_PAYLOAD).is_file():
        checkpoints = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        newest = latest_checkpoint(checkpoints)
        if newest is None:
            raise CheckpointError(f"{path} is a folder without a checkpoint: expected a run folder "
                                  f"(checkpoints/step_*.pt or step_*/ inside) or a DeepSpeed step folder "
                                  f"({SHARDED_PAYLOAD} inside)")
        logger.info("%s is a run folder: reading its newest checkpoint, %s", path, newest.name)
        path = newest
    return _step_file(path)


def _step_file(path: Path) -> Path:
    """A step file as it is, a DeepSpeed step folder's fastdino.pt; CheckpointError when it is absent."""
    if path.is_dir():
        path = path / SHARDED_PAYLOAD
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


# torch.load's refusal names the class it would have to unpickle.
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*m")


def torch_load_safely(path: Path, map_location="cpu"):
    """`torch.load(path, weights_only=True)`: tensors and plain values, never arbitrary pickles.

    argparse.Namespace is allowed as well: official DINO training checkpoints keep their
    command-line arguments in one (plain values only). Raises CheckpointError, one line,
    for any other pickled class (naming it) and for damaged or foreign files.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = _TERMINAL_CODES.sub("", str(exc))
        unsafe = _UNSAFE_GLOBAL.search(text)
        if unsafe:
            raise CheckpointError(f"cannot read {path}: it pickles a {unsafe.group(1)} object, and fastdino loads "
                                  f"only tensors and plain values (never arbitrary pickled code); save the weights "
                                  f"as a plain state_dict of tensors") from None
        reason = text.strip().splitlines()[0] if text.strip() else ""
        raise CheckpointError(f"cannot read {path}: unreadable as PyTorch or safetensors weights, corrupted or "
                              f"truncated ({type(exc).__name__}: {reason})") from None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A fastdino training checkpoint to resume from: a step file, or a DeepSpeed step folder (its
    fastdino.pt: everything but the optimizer). Raises CheckpointError for anything else."""
    path = _step_file(Path(path))
    state = torch_load_safely(path, map_location)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a fastdino v{CHECKPOINT_VERSION} training checkpoint")
    return state


def load_backbone(path: str | Path, which: str = "teacher", *, arch: str | None = None,
                  patch_size: int | None = None):
    """The teacher's (or student's) backbone in eval mode from any checkpoint kind that
    `fastdino.eval.export.read_backbone` reads (training checkpoints, run folders, official
    DINO files, exports); `arch` and `patch_size`, given, win over what the file says. Returns
    (backbone, the run config of a fastdino training checkpoint, else None). Raises
    CheckpointError when the file cannot be read or does not fit a ViT."""
    from fastdino.eval.export import read_backbone

    backbone, weights = read_backbone(path, which, arch, patch_size)
    return backbone, weights.config
