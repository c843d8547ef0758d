"""A run folder is the user's record of one run: one writer at a time, never mixed with another run.

- One writer: rank 0 holds `fcntl.flock` on `<output_dir>/.lock` for the whole run; the file
  names the holder (host, pid, start time, command). The kernel drops the lock when the
  process dies, however it dies, so a killed run never blocks the next one.
- No mixing: a fresh run (no `--resume`) refuses a folder that holds checkpoints or a
  non-empty `log.jsonl`, unless asked to `--overwrite` them.
- `log.jsonl` survives kills: records are read line by line, a damaged last line (a write cut
  short, bytes never flushed) is dropped with a warning naming the file, and the resume's rewrite
  goes to a temporary file, flushed, then renamed over the log.
- `run.json` keeps the earlier launches of a resumed run.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

from fastdino.config import ConfigError, compose_config, load_config
from fastdino.train import checkpoint as ckpt

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
LOG_FILE = "log.jsonl"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


class RunFolderError(RuntimeError):
    """The run folder is in use, holds another run, or its records cannot be read; one line."""


class RunLock:
    """The one-writer lock of a run folder, held from `acquire` until `release` or process exit."""

    def __init__(self, path: Path, file):
        self.path = path
        self._file = file

    @classmethod
    def acquire(cls, output_dir: Path) -> "RunLock | None":
        """Locks `output_dir` or raises RunFolderError naming the holder. Returns None, with a
        warning, on file systems without flock (Lustre mounted without `-o flock`): the run goes
        on unguarded rather than not at all."""
        path = Path(output_dir) / LOCK_FILE
        file = open(path, "a+")  # not "w": truncating would erase the holder's name before we know we hold it
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            file.seek(0)
            holder = file.read().strip()
            file.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"run folder {output_dir} is in use by another run ({holder or 'holder unknown'}"
                                     f"): one run writes to a folder at a time; wait for it to end or choose "
                                     f"another output_dir") from None
            logger.warning("cannot lock %s (%s): nothing stops a second run from writing into this folder",
                           path, os.strerror(exc.errno or 0))
            return None
        file.seek(0)
        file.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}: {' '.join(sys.argv)}\n")
        file.flush()
        return cls(path, file)

    def release(self) -> None:
        """Drops the lock. The file stays: a run that has just opened it would otherwise lock the
        deleted file while the next run locks a new one, and both would write."""
        if not self._file.closed:
            self._file.truncate(0)
            self._file.close()  # closing releases the flock


def records_in(output_dir: Path) -> str | None:
    """What of a training run `output_dir` holds ("3 checkpoints and log.jsonl"), None when nothing."""
    found = []
    checkpoints = ckpt.list_checkpoints(Path(output_dir) / CHECKPOINT_DIR)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint{'s' if len(checkpoints) > 1 else ''}")
    log = Path(output_dir) / LOG_FILE
    if log.is_file() and log.stat().st_size > 0:
        found.append(LOG_FILE)
    return " and ".join(found) or None


def check_fresh(output_dir: Path) -> None:
    """Raises RunFolderError when `output_dir` holds another run's checkpoints or log: a fresh run
    would append to its log and mix its checkpoints with the new ones."""
    held = records_in(output_dir)
    if held:
        raise RunFolderError(f"{output_dir} already holds a run ({held}): continue it with --resume auto, "
                             f"replace it with --overwrite, or choose another output_dir")


def clear_records(output_dir: Path) -> None:
    """Deletes the checkpoints and log.jsonl of the run in `output_dir` (--overwrite). The folder is
    renamed away first, so a kill half-way never leaves a partial checkpoint under a step name."""
    output_dir = Path(output_dir)
    held = records_in(output_dir)
    checkpoints = output_dir / CHECKPOINT_DIR
    if checkpoints.exists():
        trash = output_dir / f".trash-{CHECKPOINT_DIR}-{os.getpid()}"
        os.replace(checkpoints, trash)
        shutil.rmtree(trash, ignore_errors=True)
    (output_dir / LOG_FILE).unlink(missing_ok=True)
    if held:
        logger.warning("--overwrite: deleted the previous run's %s in %s", held, output_dir)


def remove_leftovers(output_dir: Path) -> None:
    """Deletes what a kill left of this module's writes in `output_dir`: temporary files of
    atomic_write_text and checkpoint folders an --overwrite had renamed away but not yet deleted.
    Call it while holding the folder's lock."""
    for entry in Path(output_dir).iterdir():
        name = entry.name
        if name.startswith(f".trash-{CHECKPOINT_DIR}-"):
            shutil.rmtree(entry, ignore_errors=True)
        elif name.startswith(".") and ".tmp-" in name and name.split(".tmp-")[0][1:] in (CONFIG_FILE, LOG_FILE,
                                                                                         RUN_FILE):
            entry.unlink(missing_ok=True)


def read_log(path: Path) -> list[dict]:
    """The records of a log.jsonl. A damaged last line (partial, not UTF-8, not a JSON object with a
    step: what a kill mid-write or a crash before the data reached the disk leaves) is dropped with
    a warning naming the file; a damaged line before it is a RunFolderError naming file and line."""
    lines = Path(path).read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            if number < len(lines):
                raise RunFolderError(f"{path} line {number} is damaged ({exc}): repair or delete that line, "
                                     f"then resume") from None
            logger.warning("%s: dropping its damaged last line (%d bytes; %s), left by a run that stopped "
                           "while writing it", path, len(raw), exc)
            continue
        records.append(record)
    return records


def atomic_write_text(path: Path, text: str) -> None:
    """`text` to a temporary file beside `path`, flushed to disk, renamed over `path`, the folder
    flushed: a kill at any point leaves either the old file or the new one, whole."""
    path = Path(path)
    ckpt.atomic_write_bytes(path, text.encode())
    ckpt.fsync_dir(path.parent)


def write_log(path: Path, records: list[dict]) -> None:
    """Replaces log.jsonl by `records` atomically (a resume keeps those of the steps it does not run
    again): a kill during the rewrite leaves the old log or the new one, never an empty file."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def write_launch(output_dir: Path, launch: dict, resumed: bool) -> None:
    """run.json: this launch's record at the top level; a resumed run keeps its earlier launches,
    oldest first, under `previous_launches`."""
    path = Path(output_dir) / RUN_FILE
    previous = []
    if resumed and path.is_file():
        try:
            old = json.loads(path.read_text())
            previous = [*old.pop("previous_launches", []), old]
        except (ValueError, AttributeError, TypeError) as exc:
            logger.warning("%s is unreadable (%s): the earlier launches are not carried over", path, exc)
    atomic_write_text(path, json.dumps({**launch, "previous_launches": previous}, indent=2, allow_nan=False) + "\n")


def in_run_folder(checkpoint: Path, output_dir: Path) -> bool:
    """Whether `checkpoint` (a step file or step folder) is one of `output_dir`'s own checkpoints."""
    return Path(checkpoint).resolve().parent == (Path(output_dir) / CHECKPOINT_DIR).resolve()


def launch_config(config_path: str | None, overrides: list[str], resume: str | None):
    """The config of a `fastdino train` launch. Without --resume: default.yaml <- --config <- overrides.
    With --resume, the run's own config.yaml goes under --config and the overrides, so that
    `--resume auto output_dir=RUN` needs nothing else: RUN's for `auto`, that of the run folder
    holding the checkpoint for a path. Whether the result may continue the checkpoint is checked
    by the trainer against the config saved in the checkpoint. A checkpoint outside a run folder's
    checkpoints/ brings no config.yaml: everything comes from --config and the overrides."""
    if not resume:
        return load_config(config_path, overrides)
    if resume == "auto":
        saved = Path(compose_config(config_path, overrides).output_dir) / CONFIG_FILE
    else:
        holder = Path(resume).resolve().parent  # RUN/checkpoints/ for RUN/checkpoints/step_X(.pt)
        saved = holder.parent / CONFIG_FILE if holder.name == CHECKPOINT_DIR else None
    if saved is not None and saved.is_file():
        return load_config(config_path, overrides, base=saved)
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        if resume != "auto":
            raise
        # The usual cause: the run folder was not named, so output_dir is the default's.
        raise ConfigError(f"--resume auto: {saved.parent} holds no run (no {CONFIG_FILE}); name the run folder "
                          f"with output_dir=RUN ({exc})") from None
