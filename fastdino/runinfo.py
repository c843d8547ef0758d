"""What a run needs to be reproduced: command, git revision, versions, hardware."""
from __future__ import annotations

import datetime
import importlib.metadata
import logging
import platform
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def run_metadata(device: torch.device) -> dict:
    return {
        "command": " ".join(sys.argv),
        "git_revision": git_revision(),
        "versions": package_versions(),
        "device": device_name(device),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Console and (optionally) a run's train.log get the same readable lines."""
    root = logging.getLogger()
    root.setLevel(level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_fastdino_console", False) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(formatter)
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
