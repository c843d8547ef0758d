"""Run folders are the user's record: a resume that does not fit changes nothing, resumes read the
run's own config, a new run never mixes with an old one, one writer at a time, and log.jsonl
survives kills. Tiny model, synthetic data, a few steps."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastdino.cli import main
from fastdino.config import ConfigError, load_config
from fastdino.train import run_folder
from fastdino.train.checkpoint import CheckpointError, atomic_torch_save, list_checkpoints
from fastdino.train.run_folder import RunFolderError, RunLock
from fastdino.train.trainer import Trainer

from test_parallel import env, torchrun
from test_train import TINY

ROOT = Path(__file__).resolve().parent.parent


def config(run_dir, *extra):
    return load_config(None, [*TINY, f"output_dir={run_dir}", "data.path=synthetic", *extra])


def train(run_dir, *extra, **kwargs):
    return Trainer(config(run_dir, *extra), **kwargs).train()


def steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdino: ")]
    assert len(lines) == 1, lines
    return lines[0]


def snapshot(run_dir) -> dict:
    return {name: (run_dir / name).read_bytes() for name in ("config.yaml", "run.json", "log.jsonl")}


def test_a_resume_that_does_not_fit_names_the_keys_and_changes_nothing(tmp_path, capsys):
    train(tmp_path, "max_steps=2")
    before = snapshot(tmp_path)
    code = main(["train", "--resume", "auto", *TINY, f"output_dir={tmp_path}", "model.out_dim=32", "optim.lr=0.01",
                 "max_steps=3"])
    line = one_error_line(capsys)
    assert code == 1 and "cannot change on resume" in line
    assert "model.out_dim 64 -> 32" in line and "optim.lr 0.0005 -> 0.01" in line and "max_steps" not in line
    assert snapshot(tmp_path) == before


def test_a_weights_mismatch_shows_the_mismatch(tmp_path):
    """A checkpoint without its config (nothing to compare keys with) fails at load_state_dict: the
    message keeps torch's lines after 'Error(s) in loading state_dict for ...:', on one line."""
    train(tmp_path, "max_steps=2")
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    state = torch.load(path, weights_only=True)
    del state["config"]
    atomic_torch_save(state, path, checksum=True)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        Trainer(config(tmp_path, "model.out_dim=32", "max_steps=3"), resume="auto")
    assert "size mismatch" in str(err.value) and "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_resume_auto_reads_the_runs_own_config(tmp_path, capsys):
    """No data.path (nor the tiny model) on the command line: they come from RUN/config.yaml."""
    assert main(["train", *TINY, f"output_dir={tmp_path}", "data.path=synthetic", "max_steps=2"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "auto", f"output_dir={tmp_path}", "max_steps=3", "log_every=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    assert steps(tmp_path) == [0, 1, 2]
    saved = load_config(tmp_path / "config.yaml")
    assert saved.max_steps == 3 and saved.log_every == 2 and saved.model.depth == 1
    launches = json.loads((tmp_path / "run.json").read_text())
    assert launches["start_step"] == 2 and launches["resumed_from"].endswith("step_00000002.pt")
    assert [launch["start_step"] for launch in launches["previous_launches"]] == [0]


def test_resume_from_another_runs_checkpoint_starts_a_new_record(tmp_path, capsys):
    """--resume PATH reads the config of the run folder holding PATH; into another folder it is a new
    record there (refused where another run lives, as a fresh run is)."""
    source, branch = tmp_path / "source", tmp_path / "branch"
    train(source, "max_steps=2")
    checkpoint = str(list_checkpoints(source / "checkpoints")[-1])
    assert main(["train", "--resume", checkpoint, f"output_dir={branch}", "max_steps=3"]) == 0
    assert steps(branch) == [2] and steps(source) == [0, 1]
    launch = json.loads((branch / "run.json").read_text())
    assert launch["resumed_from"] == checkpoint and launch["previous_launches"] == []
    capsys.readouterr()
    assert main(["train", "--resume", checkpoint, f"output_dir={branch}", "max_steps=3"]) == 1
    assert "already holds a run" in one_error_line(capsys)


def test_a_new_run_refuses_a_folder_holding_a_run(tmp_path, capsys):
    train(tmp_path, "max_steps=3")
    before = snapshot(tmp_path)
    assert main(["train", *TINY, f"output_dir={tmp_path}", "data.path=synthetic", "max_steps=2"]) == 1
    line = one_error_line(capsys)
    assert "1 checkpoint and log.jsonl" in line and "--resume auto" in line and "--overwrite" in line
    assert snapshot(tmp_path) == before
    # --overwrite replaces it: the old checkpoints and records are gone
    assert main(["train", "--overwrite", *TINY, f"output_dir={tmp_path}", "data.path=synthetic", "max_steps=2"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]
    assert steps(tmp_path) == [0, 1]
    assert json.loads((tmp_path / "run.json").read_text())["previous_launches"] == []


def test_overwrite_cannot_resume_its_own_folder(tmp_path):
    with pytest.raises(RunFolderError, match="--overwrite"):
        Trainer(config(tmp_path), resume="auto", overwrite=True)


def test_one_writer_per_run_folder(tmp_path):
    first = Trainer(config(tmp_path, "max_steps=1"))
    with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()} on "):
        Trainer(config(tmp_path, "max_steps=1"))
    first.train()  # releases the folder when it ends
    train(tmp_path, "max_steps=2", resume="auto")
    assert steps(tmp_path) == [0, 1]


HOLDER = textwrap.dedent("""
    import sys, time
    from fastdino.train.run_folder import RunLock
    lock = RunLock.acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_killed_holder_does_not_block_the_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid} on "):
            RunLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    RunLock.acquire(tmp_path).release()


def write_log(run_dir, records, tail=b""):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.jsonl").write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + tail)


def test_a_run_killed_before_its_first_checkpoint_restarts_its_log(tmp_path, caplog):
    """--resume auto without a checkpoint starts again at step 0: the old records of those steps go."""
    write_log(tmp_path, [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 1.0}])
    with caplog.at_level(logging.WARNING):
        train(tmp_path, "max_steps=2", resume="auto")
    assert any("no checkpoint" in r.getMessage() for r in caplog.records)
    assert steps(tmp_path) == [0, 1]


@pytest.mark.parametrize("tail", [b'{"step": 2, "loss": 0.5', b"\x00\x00\x00\x00", b"\xff\xfe{]\n"],
                         ids=["partial", "never-flushed", "not-utf8"])
def test_a_damaged_last_log_line_is_dropped_with_a_warning(tmp_path, tail, caplog):
    train(tmp_path, "max_steps=2")
    with open(tmp_path / "log.jsonl", "ab") as f:
        f.write(tail)
    with caplog.at_level(logging.WARNING):
        train(tmp_path, "max_steps=3", resume="auto")
    assert any(str(tmp_path / "log.jsonl") in r.getMessage() and "damaged last line" in r.getMessage()
               for r in caplog.records)
    assert steps(tmp_path) == [0, 1, 2]


def test_a_damaged_line_inside_the_log_names_file_and_line(tmp_path):
    write_log(tmp_path, [{"step": 0}], tail=b"{oops\n" + json.dumps({"step": 1}).encode() + b"\n")
    with pytest.raises(RunFolderError, match=r"log.jsonl line 2 is damaged"):
        run_folder.read_log(tmp_path / "log.jsonl")


def test_the_log_rewrite_is_atomic(tmp_path, monkeypatch):
    """A failure (or kill) before the rename leaves the old log whole, and no temporary file."""
    write_log(tmp_path, [{"step": 0}, {"step": 1}])
    before = (tmp_path / "log.jsonl").read_bytes()

    def killed(*args):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError):
        run_folder.write_log(tmp_path / "log.jsonl", [{"step": 0}])
    assert (tmp_path / "log.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_changeable_keys_resume(tmp_path):
    """Stopping, logging, saving, evaluation and implementation switches may change on resume."""
    train(tmp_path, "max_steps=2")
    summary = train(tmp_path, "max_steps=3", "log_every=5", "keep_checkpoints=1", "dino.loss_impl=torch",
                    "model.attn_backend=math", "parallel.timeout_s=60", resume="auto")
    assert summary["steps"] == 3
    with pytest.raises(ConfigError, match=r"seed 0 -> 1.*data.n_local_crops 2 -> 3|data.n_local_crops 2 -> 3.*seed"):
        Trainer(config(tmp_path, "seed=1", "data.n_local_crops=3"), resume="auto")


def test_two_ranks_refuse_together(tmp_path):
    """Only rank 0 checks the folder; its refusal stops every rank (no rank left waiting)."""
    train(tmp_path, "max_steps=1")
    result = subprocess.run(torchrun("-m", "fastdino", "train", *TINY, f"output_dir={tmp_path}",
                                     "data.path=synthetic", "max_steps=1", port=29701),
                            capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode != 0
    assert result.stderr.count("fastdino: error: ") == 2 and "already holds a run" in result.stderr, \
        result.stderr[-3000:]


def test_leftovers_of_killed_writes_go_at_the_next_launch(tmp_path):
    leftovers = [tmp_path / ".log.jsonl.tmp-4242", tmp_path / ".config.yaml.tmp-4242", tmp_path / ".run.json.tmp-7"]
    for path in leftovers:
        path.write_text("partial")
    (tmp_path / ".trash-checkpoints-99").mkdir()
    (tmp_path / ".trash-checkpoints-99" / "step_00000001.pt").write_bytes(b"x")
    (tmp_path / ".notes.tmp-1").write_text("the user's")
    train(tmp_path, "max_steps=1")
    assert not any(path.exists() for path in leftovers) and not (tmp_path / ".trash-checkpoints-99").exists()
    assert (tmp_path / ".notes.tmp-1").exists()


def test_resume_auto_without_a_run_names_the_folder(tmp_path, monkeypatch, capsys):
    """The usual mistake: the run folder not named, so --resume auto looks in the default one."""
    from fastdino.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastdino: error: --resume auto: runs/default holds no run") and "output_dir=RUN" in err
