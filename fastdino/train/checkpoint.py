"""Atomic, resumable checkpoints that load with `torch.load(weights_only=True)`.

A checkpoint is written to a temporary file in the same folder, flushed to disk,
then renamed over its final name, so a crash mid-write never leaves a file that
looks complete. Checkpoints hold only tensors and plain Python values.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")


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
    """Writes step_<step>.pt, then deletes all but the newest `keep` step files."""
    path = checkpoint_path(checkpoint_dir, step)
    atomic_torch_save({"version": CHECKPOINT_VERSION, "step": step, "rng": rng_state(), **payload}, path)
    for old in list_checkpoints(checkpoint_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(p for p in checkpoint_dir.iterdir() if _STEP_FILE.match(p.name))


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a fastdino v{CHECKPOINT_VERSION} training checkpoint")
    return state


def load_backbone(path: str | Path, which: str = "teacher"):
    """The teacher's (or student's) backbone of a training checkpoint, built from the
    config stored in it. Returns (backbone in eval mode, run config)."""
    from omegaconf import OmegaConf

    from fastdino.ssl.meta_arch import build_backbone

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    state = load_checkpoint(path)
    cfg = OmegaConf.create(state["config"])
    backbone = build_backbone(cfg.model, drop_path_rate=0.0)
    prefix = "backbone."
    weights = {k[len(prefix):]: v for k, v in state[which].items() if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: {which} backbone keys do not match the model "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return backbone.eval(), cfg
