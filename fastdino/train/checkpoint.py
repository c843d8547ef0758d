"""Atomic, checksummed, resumable checkpoints that load without running pickled code.

One process writes one file, `step_<step>.pt`: to a temporary file in the same
folder, flushed to disk, then renamed over its final name, so a crash mid-write
never leaves a file that looks complete. Its SHA-256 goes to `step_<step>.pt.sha256`
(`sha256sum` format) before the rename, so a step file never exists without it.
Checkpoints hold only tensors and plain Python values.

A DeepSpeed run writes a folder, `step_<step>/`: DeepSpeed's sharded files (model
states, one ZeRO optimizer shard per rank), `rank_<r>.pt` (each rank's RNG state),
`fastdino.pt` (a one-process checkpoint without the optimizer: student, teacher,
centre, step, k-NN history, config; what export and eval read) and `SHA256SUMS`
(every file's SHA-256; `sha256sum -c SHA256SUMS` inside the folder checks it). Every
rank writes into `.tmp-step_<step>/`; after a barrier rank 0 writes SHA256SUMS and
renames the folder to its final name, so a folder named `step_<step>` is always
complete, and a kill during the write leaves only a `.tmp-` folder, which is ignored
and cleared later (`remove_interrupted_writes`).

Reading: every checksum is verified before anything is unpickled; a checkpoint
without checksums (written before they existed) is read with a warning. Files are
unpickled with `torch.load(weights_only=True)` (`torch_load_safely`); the parallel
runner's shard files as well, through fastdino.parallel's checkpoint engine, allowing only
the few classes they hold, which fastdino.parallel names (`SHARD_PICKLED_CLASSES`). Non-finite
tensors are refused. `--resume auto` takes the newest intact checkpoint and says
which newer ones it skipped and why. Pruning deletes only checkpoints of steps
below the one just written, so it never deletes that one, nor a checkpoint of
another run at a higher step. Backbones of every checkpoint kind (these, official
DINO files, exports) come from `fastdino.eval.export.read_backbone`.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_STEP_FILE = re.compile(r"^step_(\d{8})\.pt$")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
SHARDED_PAYLOAD = "fastdino.pt"
CHECKSUM_SUFFIX = ".sha256"  # beside a step file
CHECKSUMS_FILE = "SHA256SUMS"  # inside a step folder
# Official DINO training checkpoints keep their command-line arguments in one (plain values only).
_SAFE_EVERYWHERE = (argparse.Namespace,)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or does not fit the run."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose bytes are not what was written (checksum mismatch, truncated, empty,
    non-finite tensors): `--resume auto` skips it for an older one."""


class _HashingWriter:
    """What torch.save writes through: hashes the bytes on their way to the file, and keeps the
    OSError behind a failed write, which torch's zip writer reports only as "unexpected pos"."""

    def __init__(self, file):
        self.file, self.sha256, self.error = file, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def _write_failure(path: Path, exc: BaseException) -> CheckpointError:
    """One line for a write that failed: "no space left" when the device is full (ENOSPC, or a
    quota), naming the folder, else the OS's reason."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = path.parent.parent if path.parent.name.startswith(".tmp-step_") else path.parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return CheckpointError(f"no space left on the device holding {folder} ({free}): {path.name} was not "
                               f"written; free some space, then continue with --resume auto (earlier checkpoints "
                               f"are intact)")
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CheckpointError(f"cannot write {path}: {reason}")


def _save_to(obj, path: Path) -> str:
    """torch.save(obj) into `path`, flushed to disk; the SHA-256 of the bytes written. A failed
    write raises the OSError behind it where there is one."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as exc:
            raise writer.error or exc from None
        f.flush()
        os.fsync(f.fileno())
    return writer.sha256.hexdigest()


def write_torch_file(obj, path: Path) -> None:
    """torch.save(obj) into `path`, flushed to disk, in place (for files inside a folder that is
    renamed into place once complete); a failed write is a one-line CheckpointError."""
    try:
        _save_to(obj, path)
    except (OSError, RuntimeError) as exc:
        raise _write_failure(Path(path), exc) from None


def atomic_torch_save(obj, path: str | Path, *, checksum: bool = False) -> None:
    """torch.save(obj) to a temporary file beside `path`, flushed, then renamed over `path`: a kill
    at any point leaves either the old file or the new one, whole. checksum: also writes
    `path + .sha256` (its SHA-256, sha256sum format) before the rename. A failed write (a full
    disk) is a one-line CheckpointError, and leaves no temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            digest = _save_to(obj, tmp)
        except (OSError, RuntimeError) as exc:
            raise _write_failure(path, exc) from None
        if checksum:
            _write_checksums(_sidecar(path), {path.name: digest})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sidecar(step_file: Path) -> Path:
    return step_file.with_name(step_file.name + CHECKSUM_SUFFIX)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`data` to a temporary file beside `path`, flushed to disk, then renamed over `path`: a kill at
    any point leaves either the old file or the new one, whole, and no temporary file behind.
    Raises OSError as the write does."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_checksums(path: Path, digests: dict[str, str]) -> None:
    """`digests` ({file name relative to path's folder: SHA-256}) as sha256sum writes them, atomically."""
    try:
        atomic_write_bytes(path, "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items())).encode())
    except OSError as exc:
        raise _write_failure(path, exc) from None


def _read_checksums(path: Path) -> dict[str, str]:
    digests = {}
    try:
        for line in path.read_text().splitlines():
            digest, _, name = line.partition("  ")
            if not re.fullmatch(r"[0-9a-f]{64}", digest) or not name:
                raise ValueError(f"not a sha256sum line: {line[:80]!r}")
            digests[name] = digest
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DamagedCheckpointError(f"checksum file {path} is damaged ({exc})") from None
    return digests


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
    """Writes step_<step>.pt and its checksum, then deletes all but the newest `keep` checkpoints
    of earlier steps (see _prune) and what interrupted writes left."""
    path = checkpoint_path(checkpoint_dir, step)
    atomic_torch_save({"version": CHECKPOINT_VERSION, "step": step, "rng": rng_state(), **payload}, path,
                      checksum=True)
    fsync_dir(checkpoint_dir)
    _prune(checkpoint_dir, keep, path)
    remove_interrupted_writes(checkpoint_dir)
    return path


def _discard(path: Path) -> None:
    """Renames first, then deletes: a kill half-way through never leaves a damaged checkpoint under
    a checkpoint's name (what is left, a .trash- entry, goes at the next start)."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)
        _sidecar(path).unlink(missing_ok=True)


def _prune(checkpoint_dir: Path, keep: int, written: Path) -> None:
    """Keeps `written` and the newest keep - 1 checkpoints of earlier steps. Checkpoints of later
    steps are not this run's line (another run's in the same folder, or the future of a run resumed
    from an earlier checkpoint): they are never deleted. keep <= 0 keeps everything."""
    if keep <= 0:
        return
    step = checkpoint_step(written)
    earlier = [p for p in list_checkpoints(checkpoint_dir) if checkpoint_step(p) < step]
    for old in earlier[: max(0, len(earlier) - (keep - 1))]:
        _discard(old)


def remove_interrupted_writes(checkpoint_dir: Path) -> int:
    """Deletes what writes and deletions killed half-way left in `checkpoint_dir` (temporary files,
    `.tmp-step_*` folders, `.trash-*` entries, checksum files without their step file); returns
    the bytes freed. Call it where no checkpoint is being written (at start, on the writing rank)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return 0
    freed, removed = 0, []
    for entry in checkpoint_dir.iterdir():
        name = entry.name
        interrupted = name.startswith((".tmp-step_", ".trash-")) or (name.startswith(".step_") and ".tmp-" in name)
        orphan = name.endswith(CHECKSUM_SUFFIX) and not (checkpoint_dir / name[: -len(CHECKSUM_SUFFIX)]).exists()
        if not (interrupted or orphan):
            continue
        files = [entry] if not entry.is_dir() else [p for p in entry.rglob("*") if p.is_file()]
        freed += sum(p.stat().st_size for p in files if p.exists())
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    if removed:
        logger.info("removed %d leftover(s) of interrupted checkpoint writes in %s (%.1f MB): %s", len(removed),
                    checkpoint_dir, freed / 1e6, ", ".join(sorted(removed)[:5]) + (" ..." if len(removed) > 5 else ""))
    return freed


def save_sharded_checkpoint(checkpoint_dir: Path, step: int, write_shards, payload: dict, keep: int, rank: int,
                            barrier) -> Path:
    """Called by every rank of a sharded run (see the module docstring). `write_shards(folder, tag)`
    writes this rank's shards into folder/tag (the parallel runner's own files); `payload` is used
    on rank 0."""
    final = checkpoint_dir / f"step_{step:08d}"
    tag = f".tmp-step_{step:08d}"
    staging = checkpoint_dir / tag
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    write_shards(checkpoint_dir, tag)
    atomic_torch_save({"rng": rng_state()}, staging / f"rank_{rank:05d}.pt")
    if rank == 0:
        atomic_torch_save({"version": CHECKPOINT_VERSION, "step": step, "rng": rng_state(), **payload},
                          staging / SHARDED_PAYLOAD)
    barrier()  # every rank's files are in place
    if rank == 0:
        _write_checksums(staging / CHECKSUMS_FILE, {p.relative_to(staging).as_posix(): _sha256(p)
                                                    for p in staging.rglob("*") if p.is_file()})
        if final.exists():
            _discard(final)
        os.replace(staging, final)
        fsync_dir(checkpoint_dir)
        _prune(checkpoint_dir, keep, final)
        remove_interrupted_writes(checkpoint_dir)
    barrier()
    return final


def load_sharded_rank_state(path: Path, rank: int) -> dict:
    rank_file = Path(path) / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no state for rank {rank}: resume with the world size it was "
                              f"written with")
    return torch_load_safely(rank_file, checkpoint=True)


def fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (renames into it) to disk."""
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
    name once it is complete; `.tmp-` folders of interrupted writes are not listed). Not verified:
    see verify_checkpoint."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir()
             if (_STEP_FILE.match(p.name) and p.is_file())
             or (_STEP_DIR.match(p.name) and (p / SHARDED_PAYLOAD).is_file())]
    return sorted(found, key=lambda p: (checkpoint_step(p), p.is_dir()))


# checkpoint -> the (name, size, mtime, inode) of its files when they last matched their checksums
_verified: dict[Path, tuple] = {}
_warned_unverified: set[Path] = set()


def _checksummed(checkpoint: Path) -> tuple[Path, list[Path]]:
    """(its checksum file, the files it must cover) of a step file or step folder."""
    if checkpoint.is_dir():
        return checkpoint / CHECKSUMS_FILE, sorted(p for p in checkpoint.rglob("*.pt") if p.is_file())
    return _sidecar(checkpoint), [checkpoint]


def _signature(paths) -> tuple:
    stats = [(p, p.stat()) for p in paths]
    return tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ino) for p, s in stats)


def verify_checkpoint(checkpoint: str | Path, *, warn_unverified: bool = True) -> bool:
    """Checks a step file or step folder against its checksums: True when they match, False for a
    checkpoint written without them (then only its being a complete zip archive is checked, with
    a warning unless warn_unverified is False). Raises DamagedCheckpointError naming the file that
    does not match, is missing or is not listed."""
    checkpoint = Path(checkpoint)
    manifest, files = _checksummed(checkpoint)
    if not manifest.is_file():
        payload = checkpoint / SHARDED_PAYLOAD if checkpoint.is_dir() else checkpoint
        if not zipfile.is_zipfile(payload):
            size = payload.stat().st_size if payload.is_file() else 0
            raise DamagedCheckpointError(f"checkpoint {payload} is unreadable: {'empty' if size == 0 else 'damaged'} "
                                         f"({size} bytes, not a complete PyTorch zip archive)")
        if warn_unverified and checkpoint not in _warned_unverified:
            _warned_unverified.add(checkpoint)
            logger.warning("checkpoint %s has no checksums (written before fastdino kept them): read unverified",
                           checkpoint)
        return False
    signature = _signature([manifest, *files])
    if _verified.get(checkpoint) == signature:
        return True
    expected = _read_checksums(manifest)
    base = manifest.parent
    for path in files:
        name = path.relative_to(base).as_posix()
        if name not in expected:
            raise DamagedCheckpointError(f"checkpoint {checkpoint} is damaged: {name} is not in its checksum file "
                                         f"{manifest.name}")
    for name, digest in expected.items():
        path = base / name
        if not path.is_file():
            raise DamagedCheckpointError(f"checkpoint {checkpoint} is damaged: {name} is missing")
        if _sha256(path) != digest:
            raise DamagedCheckpointError(f"checkpoint {checkpoint} is damaged: {name} does not match its SHA-256 "
                                         f"in {manifest.name} (changed on disk after it was written)")
    _verified[checkpoint] = signature
    return True


def _newest_that_passes(checkpoint_dir: Path, check):
    """(path, check(path)) of the newest checkpoint in `checkpoint_dir` that `check` does not find
    damaged, warning about each newer one it skips; (None, None) when there is no checkpoint.
    Raises DamagedCheckpointError when every one is damaged."""
    found = list_checkpoints(Path(checkpoint_dir))
    reasons = []
    for path in reversed(found):
        try:
            return path, check(path)
        except DamagedCheckpointError as exc:
            reasons.append(str(exc))
            logger.warning("skipping checkpoint %s, trying an older one: %s", path.name, exc)
    if found:
        raise DamagedCheckpointError(f"none of the {len(found)} checkpoints in {checkpoint_dir} is intact (newest: "
                                     f"{reasons[0]})")
    return None, None


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest intact checkpoint in `checkpoint_dir` (checksums verified; a damaged newer one is
    skipped with a warning saying why), None when it holds none. Raises DamagedCheckpointError when
    every checkpoint is damaged."""
    return _newest_that_passes(checkpoint_dir, verify_checkpoint)[0]


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file `path` names: a file as it is; a DeepSpeed step folder's fastdino.pt; the
    newest intact checkpoint of a run folder (or of its checkpoints/ folder), which is logged.
    A fastdino checkpoint with checksums is verified.

    Raises CheckpointError when there is no such file, or the folder holds no checkpoint, and
    DamagedCheckpointError when the checkpoint is damaged.
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
    step_file = _step_file(path)
    checkpoint = _checkpoint_of(step_file)
    if _checksummed(checkpoint)[0].is_file():
        verify_checkpoint(checkpoint)
    return step_file


def _step_file(path: Path) -> Path:
    """A step file as it is, a DeepSpeed step folder's fastdino.pt; CheckpointError when it is absent."""
    if path.is_dir():
        path = path / SHARDED_PAYLOAD
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _checkpoint_of(step_file: Path) -> Path:
    """The unit a file's checksums cover: its step folder for a fastdino.pt, else the file."""
    return step_file.parent if step_file.name == SHARDED_PAYLOAD else step_file


# torch.load's refusal names the class it would have to unpickle.
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*m")


def _unsafe_pickle_error(path, name: str, checkpoint: bool) -> CheckpointError:
    if checkpoint:
        return CheckpointError(f"cannot read {path}: it pickles a {name} object, which neither fastdino nor DeepSpeed "
                               f"writes into a checkpoint (the file was altered), and fastdino never unpickles code: "
                               f"resume from another checkpoint")
    return CheckpointError(f"cannot read {path}: it pickles a {name} object, and fastdino loads only tensors and "
                           f"plain values (never arbitrary pickled code); save the weights as a plain state_dict "
                           f"of tensors")


def torch_load_safely(path: Path, map_location="cpu", allowed=(), checkpoint: bool = False):
    """`torch.load(path, weights_only=True)`: tensors and plain values, never arbitrary pickles.

    argparse.Namespace is allowed as well (official DINO training checkpoints keep their
    command-line arguments in one, plain values only), and the classes in `allowed`. Raises
    CheckpointError, one line, for any other pickled class (naming it; checkpoint: the file is
    one of a training checkpoint's, so it was altered), DamagedCheckpointError for damaged or
    foreign files.
    """
    try:
        with torch.serialization.safe_globals([*_SAFE_EVERYWHERE, *allowed]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = _TERMINAL_CODES.sub("", str(exc))
        unsafe = _UNSAFE_GLOBAL.search(text)
        if unsafe:
            raise _unsafe_pickle_error(path, unsafe.group(1), checkpoint) from None
        reason = text.strip().splitlines()[0] if text.strip() else ""
        # torch's own advice (load with weights_only=False) is what fastdino never does: keep its first sentence
        reason = reason.split(". In PyTorch 2.6")[0]
        raise DamagedCheckpointError(f"cannot read {path}: unreadable as PyTorch or safetensors weights, corrupted "
                                     f"or truncated ({type(exc).__name__}: {reason})") from None


def refuse_unsafe_pickles(path: Path, allowed_names=()) -> None:
    """Raises CheckpointError, naming the class, when the checkpoint file `path` pickles any class but
    torch's safe ones, argparse.Namespace and `allowed_names` (qualified names). Reads the pickle's
    opcodes only, nothing is unpickled: for files that another library (DeepSpeed) loads."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip file, a damaged pickle: whatever loads it will say
        logger.debug("cannot list the pickled classes of %s: %s", path, exc)
        return
    allowed = {*allowed_names, *(f"{c.__module__}.{c.__qualname__}" for c in _SAFE_EVERYWHERE)}
    unsafe = [name for name in found if name not in allowed]
    if unsafe:
        raise _unsafe_pickle_error(path, unsafe[0], checkpoint=True)


def first_nonfinite(value, where: str = "") -> str | None:
    """The key path ("teacher/blocks.0.norm1.weight") of the first floating-point tensor in a
    nest of dicts, lists and tuples that holds a NaN or an infinity; None when there is none."""
    if isinstance(value, torch.Tensor):
        return where if value.is_floating_point() and not bool(torch.isfinite(value).all()) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = first_nonfinite(item, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def check_finite(state, path) -> None:
    """Raises DamagedCheckpointError when a tensor of `state` (read from `path`) is not finite: a
    training checkpoint never holds one (a non-finite step is never saved)."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: tensor {bad} holds NaN or infinite values, "
                                     f"which training never saves")


def load_checkpoint(path: str | Path, map_location="cpu", *, shard_classes=()) -> dict:
    """A fastdino training checkpoint to resume from: a step file, or a DeepSpeed step folder (its
    fastdino.pt: everything but the optimizer). Checksums are verified first (a checkpoint without
    them is read with a warning), every other file of a step folder (the runner's shards) is checked
    for pickled classes beyond `shard_classes` (qualified names: fastdino.parallel's
    SHARD_PICKLED_CLASSES), and non-finite tensors are refused. Raises DamagedCheckpointError for
    damage, CheckpointError for anything else."""
    step_file = _step_file(Path(path))
    checkpoint = _checkpoint_of(step_file)
    verify_checkpoint(checkpoint)
    if checkpoint.is_dir():  # DeepSpeed unpickles its own files later: refuse unsafe ones now, before it runs
        for other in sorted(checkpoint.rglob("*.pt")):
            if other != step_file:
                refuse_unsafe_pickles(other, shard_classes)
    state = torch_load_safely(step_file, map_location, checkpoint=True)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {step_file} is not a fastdino v{CHECKPOINT_VERSION} training checkpoint")
    check_finite(state, step_file)
    return state


def load_resume_checkpoint(checkpoint_dir: Path, resume: str, map_location="cpu", *,
                           shard_classes=()) -> tuple[Path | None, dict | None]:
    """(checkpoint, its state) that `--resume` names: for "auto" the newest intact one in
    `checkpoint_dir` (each damaged newer one is skipped with a warning saying why), (None, None)
    when it holds none; otherwise the path given, where damage is an error. Raises
    DamagedCheckpointError when every checkpoint is damaged, CheckpointError as load_checkpoint."""
    if resume != "auto":
        return Path(resume), load_checkpoint(resume, map_location, shard_classes=shard_classes)
    return _newest_that_passes(checkpoint_dir,
                               lambda path: load_checkpoint(path, map_location, shard_classes=shard_classes))
