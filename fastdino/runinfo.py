"""What a run needs to be reproduced: command, git revision, versions, hardware."""
from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "triton", "xformers", "deepspeed", "ffcv", "numpy", "omegaconf")


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{'-dirty' if dirty else ''}" if rev else "unknown"


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device of this rank for a `device` setting (auto | cpu | cuda): cuda:LOCAL_RANK on GPUs,
    auto taking the GPU where there is one. Raises RuntimeError for cuda without a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA GPU is available (use device=cpu or device=auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def device_name(device: torch.device) -> str:
    """The device in words: `NAME (memory GiB, SMs)` for a GPU, `PROCESSOR CPU (cores, torch threads)`."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def benchmark_context(device: torch.device, command: list[str]) -> dict:
    """The fields every benchmark row carries, so that a number can be reproduced and compared:
    device, versions, date (UTC), the exact command, OpenMP's wait policy and the machine's load
    when the measurement started (other processes skew every CPU timing)."""
    versions = package_versions()
    return dict(device=device_name(device), torch=torch.__version__, triton=versions["triton"],
                xformers=versions["xformers"], deepspeed=versions["deepspeed"], cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=shlex.join(command), omp_wait_policy=omp_wait_policy(),
                load_average_1min_at_start=round(os.getloadavg()[0], 2))


def omp_wait_policy() -> str:
    """OpenMP's wait policy in force (fastdino.cli chooses it per command; see there)."""
    return os.environ.get("OMP_WAIT_POLICY", "default (libgomp: spin, then sleep)")


def run_metadata(device: torch.device) -> dict:
    return {
        "command": " ".join(sys.argv),
        "git_revision": git_revision(),
        "versions": package_versions(),
        "device": device_name(device),
        "omp_wait_policy": omp_wait_policy(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Console and (optionally) a run's train.log get the same readable lines, except records
    logged with `extra={"file_only": True}` (the run's whole config), which only the file gets."""
    root = logging.getLogger()
    root.setLevel(level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_fastdino_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
        console.addFilter(lambda record: not getattr(record, "file_only", False))  # extra={"file_only": True}
        console._fastdino_console = True
        root.addHandler(console)
    if log_file is not None:
        for handler in [h for h in root.handlers if getattr(h, "_fastdino_file", False)]:
            root.removeHandler(handler)
            handler.close()
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        file_handler._fastdino_file = True
        root.addHandler(file_handler)
