"""Hostile and damaged inputs: pickle payloads in every file a resume reads, checksums and the
fallback of --resume auto, pruning, leftovers of interrupted writes, a full disk, damaged or
replaced .beton files, and file lists that would kill `data convert`'s writer processes."""
import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.config import load_config
from fastdino.data import DataError, convert_folder
from fastdino.data import convert as convert_module
from fastdino.data.decode import BetonImages, check_beton
from fastdino.train import checkpoint as ckpt
from fastdino.train.checkpoint import (CheckpointError, DamagedCheckpointError, latest_checkpoint, list_checkpoints,
                                       load_checkpoint, load_resume_checkpoint, remove_interrupted_writes,
                                       save_checkpoint, verify_checkpoint)
from fastdino.train.trainer import Trainer

from test_train import TINY

ROOT = Path(__file__).resolve().parent.parent


class Payload:
    """Unpickling it runs open(marker, "w"): the marker file appears if anything ever does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def tiny(run_dir, *extra):
    return load_config(None, [*TINY, f"output_dir={run_dir}", "data.path=synthetic", "checkpoint_every=1",
                              "keep_checkpoints=3", *extra])


def one_line(exc) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def sha256sum_line(path: Path, name: str) -> str:
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {name}\n"


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """A one-process run with checkpoints at steps 1, 2 and 3."""
    run = tmp_path_factory.mktemp("run")
    Trainer(tiny(run, "max_steps=3")).train()
    return run


def resumed_step(run: Path, resume: str, *extra) -> int:
    """The step a run resumed with `resume` starts at (the run is set up, not trained)."""
    trainer = Trainer(tiny(run, "max_steps=4", *extra), resume=resume)
    trainer.close()
    return trainer.start_step


def copy_run(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


# ---------------------------------------------------------------- checksums

def test_checkpoints_carry_sha256sum_checksums(one_process_run):
    checkpoints = one_process_run / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == [f"step_0000000{i}.pt" for i in (1, 2, 3)]
    for path in list_checkpoints(checkpoints):
        assert (checkpoints / f"{path.name}.sha256").read_text() == sha256sum_line(path, path.name)
        assert verify_checkpoint(path) is True


def test_a_flipped_bit_is_found_and_resume_auto_takes_the_newest_intact(one_process_run, tmp_path, caplog):
    run = copy_run(one_process_run, tmp_path)
    newest = run / "checkpoints" / "step_00000003.pt"
    flip_bit(newest, newest.stat().st_size // 2)  # inside the tensor data
    with pytest.raises(DamagedCheckpointError, match="step_00000003.pt does not match its SHA-256") as error:
        load_checkpoint(newest)
    one_line(error.value)
    with caplog.at_level(logging.WARNING):
        assert resumed_step(run, "auto") == 2
    assert any("skipping checkpoint step_00000003.pt" in r.getMessage() and "SHA-256" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(DamagedCheckpointError, match="does not match its SHA-256"):  # named explicitly: an error
        Trainer(tiny(run, "max_steps=4"), resume=str(newest))


def test_empty_and_nonfinite_checkpoints(one_process_run, tmp_path, caplog):
    run = copy_run(one_process_run, tmp_path)
    checkpoints = run / "checkpoints"
    (checkpoints / "step_00000003.pt").write_bytes(b"")  # its checksum file stays
    (checkpoints / "step_00000004.pt").write_bytes(b"")  # none: as an older fastdino would have left it
    state = torch.load(checkpoints / "step_00000002.pt", weights_only=True)
    key = next(iter(state["teacher"]))
    state["teacher"][key] = torch.full_like(state["teacher"][key], float("nan"))
    ckpt.atomic_torch_save(state, checkpoints / "step_00000002.pt", checksum=True)  # garbage with a valid checksum
    with pytest.raises(DamagedCheckpointError, match=r"step_00000004.pt is unreadable: empty \(0 bytes"):
        load_checkpoint(checkpoints / "step_00000004.pt")
    with pytest.raises(DamagedCheckpointError, match=f"tensor teacher/{key} holds NaN or infinite values"):
        load_checkpoint(checkpoints / "step_00000002.pt")
    with caplog.at_level(logging.WARNING):
        path, state = load_resume_checkpoint(checkpoints, "auto")
    assert path.name == "step_00000001.pt" and state["step"] == 1
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert [m.split()[2] for m in skipped] == ["step_00000004.pt,", "step_00000003.pt,", "step_00000002.pt,"]
    assert latest_checkpoint(checkpoints).name == "step_00000002.pt"  # checksums only: the NaN one passes them
    with pytest.raises(DamagedCheckpointError, match="holds NaN") as error:  # not blamed on a loss
        Trainer(tiny(run, "max_steps=4"), resume=str(checkpoints / "step_00000002.pt"))
    one_line(error.value)


def test_every_checkpoint_damaged_is_one_line(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for step in (1, 2):
        (checkpoints / f"step_0000000{step}.pt").write_bytes(b"\0" * 10)
    with pytest.raises(DamagedCheckpointError, match="none of the 2 checkpoints in .* is intact") as error:
        Trainer(tiny(tmp_path, "max_steps=3"), resume="auto")
    one_line(error.value)
    assert load_resume_checkpoint(tmp_path / "absent", "auto") == (None, None)


def test_checkpoints_without_checksums_are_read_with_a_warning(one_process_run, tmp_path, caplog):
    run = copy_run(one_process_run, tmp_path)
    for sidecar in (run / "checkpoints").glob("*.sha256"):
        sidecar.unlink()
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(run / "checkpoints" / "step_00000003.pt")
    assert state["step"] == 3 and "has no checksums" in caplog.text


# ---------------------------------------------------------------- pickles

def plant(path: Path, marker: Path, allowed=()) -> None:
    """Adds a Payload to the torch file `path` (a dict)."""
    with torch.serialization.safe_globals(list(allowed)):
        state = torch.load(path, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)


def test_the_payload_is_live(tmp_path):
    """The check of the tests below: loading the planted file unsafely does create the marker."""
    path, marker = tmp_path / "x.pt", tmp_path / "marker"
    torch.save({"w": torch.zeros(1)}, path)
    plant(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_pickle_in_a_step_file_never_runs(one_process_run, tmp_path):
    run = copy_run(one_process_run, tmp_path)
    marker, step_file = tmp_path / "marker", run / "checkpoints" / "step_00000003.pt"
    plant(step_file, marker)
    (run / "checkpoints" / "step_00000003.pt.sha256").write_text(sha256sum_line(step_file, step_file.name))
    for resume in ("auto", str(step_file)):
        with pytest.raises(CheckpointError, match=r"pickles a io.open object, which neither fastdino nor") as error:
            Trainer(tiny(run, "max_steps=4"), resume=resume)
        assert not isinstance(error.value, DamagedCheckpointError)  # refused, not skipped for an older one
        one_line(error.value)
    assert not marker.exists()


ZERO_CHILD = textwrap.dedent("""
    import hashlib, importlib, json, shutil, sys
    from pathlib import Path
    from fastdino.parallel import SHARD_PICKLED_CLASSES
    from fastdino.train import checkpoint as ckpt
    from fastdino.train.trainer import Trainer
    from test_integrity import FullDisk, plant, resumed_step, tiny

    root = Path(sys.argv[1])
    zero = ["parallel.zero_stage=2"]
    Trainer(tiny(root / "run", "max_steps=2", *zero)).train()
    allowed = [getattr(importlib.import_module(m), n)
               for m, _, n in (q.rpartition(".") for q in SHARD_PICKLED_CLASSES)]
    report = {}
    for name in ("fastdino.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "rank_00000.pt"):
        run = root / name
        shutil.copytree(root / "run", run)
        step = run / "checkpoints" / "step_00000002"
        plant(step / name, root / f"marker-{name}", allowed)
        sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\\n" for p in sorted(step.glob("*.pt")))
        (step / "SHA256SUMS").write_text(sums)
        try:
            resumed_step(run, "auto", *zero)
            report[name] = "resumed"
        except ckpt.CheckpointError as exc:
            report[name] = f"{type(exc).__name__}: {exc}"
    # DeepSpeed's own loading goes through the safe engine: planted files are refused there as well
    trainer = Trainer(tiny(root / "fresh", "max_steps=3", *zero))
    optim = root / "zero_pp_rank_0_mp_rank_00_optim_states.pt" / "checkpoints" / "step_00000002"
    try:
        trainer.runner.engine.load_checkpoint(str(optim.parent), tag=optim.name)
        report["engine"] = "loaded"
    except ckpt.CheckpointError as exc:
        report["engine"] = str(exc)
    # a bit flipped in the newest ZeRO shard: resume auto takes step 1
    flipped = root / "run" / "checkpoints" / "step_00000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(flipped.read_bytes()); data[len(data) // 2] ^= 1; flipped.write_bytes(bytes(data))
    report["flipped_start"] = resumed_step(root / "run", "auto", *zero)
    # a full disk while DeepSpeed writes its files
    real_open = open
    ckpt.open = lambda path, mode="r", *a, **k: (FullDisk(real_open(path, mode, *a, **k), 0) if "w" in mode
                                                 else real_open(path, mode, *a, **k))
    try:
        trainer.save(7)
        report["full"] = "saved"
    except ckpt.CheckpointError as exc:
        report["full"] = str(exc)
    finally:
        del ckpt.open
    report["markers"] = sorted(p.name for p in root.glob("marker-*"))
    print(json.dumps(report))
""")


def test_pickles_in_deepspeed_checkpoints_never_run(tmp_path):
    """ZeRO-2 on one rank: a payload planted in each file a resume reads (fastdino.pt, DeepSpeed's
    model states and optimizer shard, the rank's RNG file; checksums rewritten to match) is refused
    in one line naming the class, before DeepSpeed runs, and by DeepSpeed's (our) checkpoint engine."""
    script = tmp_path / "child.py"
    script.write_text(ZERO_CHILD)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["markers"] == [], report
    for name in ("fastdino.pt", "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "rank_00000.pt"):
        assert report[name].startswith("CheckpointError: cannot read"), (name, report[name])
        assert f"{name}: it pickles a io.open object" in report[name] and "\n" not in report[name], name
    assert "it pickles a io.open object" in report["engine"], report["engine"]
    assert report["flipped_start"] == 1
    assert report["full"].startswith("no space left on the device holding "), report["full"]


# ---------------------------------------------------------------- run folders and writes

def test_pruning_keeps_the_checkpoint_just_written_and_other_runs(tmp_path):
    """A new run in a folder holding a finished run's later steps: pruning deletes only this
    run's earlier checkpoints (it used to keep the highest steps and delete the new ones)."""
    checkpoints = tmp_path / "checkpoints"
    for step in (100, 101):
        save_checkpoint(checkpoints, step, {}, keep=2)
    for step in (1, 2, 3):
        save_checkpoint(checkpoints, step, {}, keep=2)
    assert [ckpt.checkpoint_step(p) for p in list_checkpoints(checkpoints)] == [2, 3, 100, 101]
    assert sorted(p.name for p in checkpoints.glob("*.sha256")) == [f"step_{s:08d}.pt.sha256" for s in (2, 3, 100, 101)]
    save_checkpoint(checkpoints, 4, {}, keep=1)
    assert [ckpt.checkpoint_step(p) for p in list_checkpoints(checkpoints)] == [4, 100, 101]


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    save_checkpoint(checkpoints, 1, {}, keep=0)
    leftovers = [checkpoints / ".step_00000002.pt.tmp-4242", checkpoints / ".step_00000002.pt.sha256.tmp-4242",
                 checkpoints / ".trash-step_00000000.pt-77", checkpoints / "step_00000009.pt.sha256"]
    for path in leftovers:
        path.write_bytes(b"x" * 1000)
    (checkpoints / ".tmp-step_00000003").mkdir()
    (checkpoints / ".tmp-step_00000003" / "fastdino.pt").write_bytes(b"x" * 500)
    assert remove_interrupted_writes(checkpoints) == 4500
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]
    for path in leftovers:  # and saving clears them too
        path.write_bytes(b"x")
    save_checkpoint(checkpoints, 2, {}, keep=0)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256",
                                                             "step_00000002.pt", "step_00000002.pt.sha256"]


class FullDisk:
    """A file whose writes fail as on a full disk, after `room` bytes."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.file.close()


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, "max_steps=1"))
    trainer.close()
    real_open = open
    for room in (0, 100_000):  # at the first write; in the middle (torch's zip writer says "unexpected pos")
        monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *args, **kwargs: FullDisk(
            real_open(path, mode, *args, **kwargs), room) if "w" in mode else real_open(path, mode, *args, **kwargs),
            raising=False)
        with pytest.raises(CheckpointError, match=r"^no space left on the device holding .*checkpoints \(\d+ MiB "
                                                  r"free\): step_00000005.pt was not written; free some space") as e:
            trainer.save(5)
        one_line(e.value)
        assert list((tmp_path / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------- .beton files

@pytest.mark.parametrize("tail", ["random", "zeros"])
def test_an_overwritten_beton_tail_is_one_line(digits_betons, tmp_path, tail):
    data = digits_betons[1].read_bytes()
    noise = bytes(4096) if tail == "zeros" else np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
    damaged = tmp_path / "val.beton"
    damaged.write_bytes(data[:-4096] + noise)
    with pytest.raises(DataError, match=r"val.beton is damaged: \d+ of its \d+ allocation table entries point "
                                        r"outside its data.*convert it again") as error:
        check_beton(damaged, source="data.path")
    assert one_line(error.value).startswith(f"data.path={damaged}")
    grown = tmp_path / "grown.beton"
    grown.write_bytes(data + b"\0" * 10)
    with pytest.raises(DataError, match="grown.beton is damaged: its allocation table .* does not fit the file"):
        check_beton(grown)


@pytest.mark.fresh_process
@pytest.mark.parametrize("os_cache", [False, True])
def test_a_beton_replaced_under_a_running_loader_is_detected(digits_betons, tmp_path, os_cache):
    train, val = digits_betons
    path = tmp_path / "data.beton"
    shutil.copy(val, path)
    images = BetonImages(path, batch_size=64, num_workers=1, os_cache=os_cache)
    order = np.arange(images.num_images)
    batches = images.batches(order)
    next(batches)
    shutil.copy(train, tmp_path / "new.beton")
    os.replace(tmp_path / "new.beton", path)  # what `data convert` does
    with pytest.raises(DataError, match="data.beton was replaced while this run was reading it") as error:
        next(batches)
    one_line(error.value)
    with pytest.raises(DataError, match="was replaced"):  # and at the next epoch
        next(images.batches(order))
    images = BetonImages(path, batch_size=64, num_workers=1, os_cache=os_cache)
    os.utime(path, ns=(1, 1))
    with pytest.raises(DataError, match="rewritten in place"):
        next(images.batches(order))


# ---------------------------------------------------------------- data convert

@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    for i in range(6):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("label", ["100000000000000000000000", "1000000000000", "-5", "2147483648", "9" * 5000])
def test_file_list_labels_out_of_range_are_one_line(small_folder, tmp_path, label):
    (tmp_path / "list.txt").write_text(f"{small_folder}/0.png 1\n{small_folder}/1.png {label}\n")
    with pytest.raises(DataError, match=r"list.txt line 2: label .+ is out of range: a label is a class index "
                                        r"from 0 to 2147483647, or -1 for none") as error:
        convert_folder(tmp_path / "list.txt", tmp_path / "out.beton", num_workers=1, progress=False)
    one_line(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt"]


@pytest.mark.fresh_process
def test_file_list_labels_at_the_limits(small_folder, tmp_path):
    (tmp_path / "list.txt").write_text(f"{small_folder}/0.png 0\n{small_folder}/1.png 2147483647\n"
                                       f"{small_folder}/2.png -1\n")
    convert_folder(tmp_path / "list.txt", tmp_path / "out.beton", num_workers=1, progress=False)
    assert BetonImages(tmp_path / "out.beton", batch_size=1).labels.tolist() == [0, 2**31 - 1, -1]


@pytest.mark.fresh_process
@pytest.mark.parametrize("death", ["exception", "sigkill"])
def test_a_dead_writer_process_is_an_error_not_a_hang(small_folder, tmp_path, monkeypatch, death):
    load = convert_module._CheckedImages.__getitem__

    def dying(self, index):  # runs in FFCV's (forked) writer processes
        image, label = load(self, index)
        if index == 3:
            if death == "sigkill":
                os.kill(os.getpid(), 9)
            return image, 10**23  # what FFCV's IntField cannot store: the worker raises
        return image, label

    monkeypatch.setattr(convert_module._CheckedImages, "__getitem__", dying)
    with pytest.raises(DataError, match=r"a writer process died \((exit code 1|killed by SIGKILL);.* while writing "
                                        r".*out.beton: nothing was written") as error:
        convert_folder(small_folder, tmp_path / "out.beton", num_workers=2, progress=False)
    one_line(error.value)
    assert list(tmp_path.iterdir()) == []


def test_fresh_process_cases():
    """The .beton loader and `data convert` cases above, in a new interpreter (see conftest.py)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "fresh_process",
                             __file__], cwd=Path(__file__).resolve().parent.parent,
                            env={**os.environ, "FASTDINO_FRESH_PROCESS": "1"}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-5000:] + result.stderr[-2000:]
