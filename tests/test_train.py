"""Tiny end-to-end runs on real digits: logging, checkpoints, exact resume, failures."""
import json
import logging
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastdino.config import load_config
from fastdino.ssl.loss import DINOLoss
from fastdino.eval.export import read_backbone
from fastdino.eval.knn import knn_accuracy
from fastdino.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from fastdino.train.trainer import NonFiniteLossError, Trainer

TINY = ["device=cpu", "progress=false", "log_every=1", "model.arch=vit_tiny", "model.depth=1", "model.patch_size=4",
        "model.img_size=16", "model.out_dim=64", "model.head_hidden_dim=32", "model.head_bottleneck_dim=16",
        "model.drop_path_rate=0.1", "data.batch_size=16", "data.n_local_crops=2", "data.global_size=16",
        "data.local_size=8", "data.num_workers=1", "optim.epochs=2", "optim.warmup_epochs=0.1", "eval.eval_size=16"]


def tiny_config(tmp_path, train_beton, *extra):
    return load_config(None, [*TINY, f"output_dir={tmp_path}", f"data.path={train_beton}", *extra])


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_train_logs_checkpoints_and_knn(tmp_path, digits_betons):
    train, val = digits_betons
    cfg = tiny_config(tmp_path, train, "max_steps=4", "checkpoint_every=2", "keep_checkpoints=1",
                      f"eval.knn_train_path={train}", f"eval.knn_val_path={val}")
    summary = Trainer(cfg).train()
    records = [r for r in read_log(tmp_path) if r.get("kind") != "eval"]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    for field in ("step", "epoch", "loss", "lr", "wd", "momentum", "teacher_temp", "img_per_s",
                  "teacher_entropy", "student_entropy", "log_k", "teacher_top_prob", "feature_std"):
        assert field in records[0], field
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # warm-up starts at zero
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "run.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004.pt"]
    assert len(summary["knn"]) == 2
    # The final k-NN is the saved teacher's: the same number from the checkpoint, through the command's pipeline.
    teacher, _ = read_backbone(tmp_path / "checkpoints" / "step_00000004.pt")
    again = knn_accuracy(teacher, train, val, size=16, batch_size=64, device="cpu", ks=(cfg.eval.knn_k,),
                         temperature=cfg.eval.knn_temperature)[cfg.eval.knn_k]
    assert summary["final_knn"]["knn_top1"] == again["top1"]
    state = load_checkpoint(tmp_path / "checkpoints" / "step_00000004.pt")  # weights_only=True inside
    assert state["step"] == 4 and "center" in state["dino_loss"]
    backbone, _ = read_backbone(tmp_path / "checkpoints" / "step_00000004.pt")
    assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 192)


def test_resume_continues_exactly(tmp_path, digits_betons):
    train, _ = digits_betons
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    Trainer(tiny_config(full_dir, train, "max_steps=5", "checkpoint_every=100")).train()
    Trainer(tiny_config(cut_dir, train, "max_steps=3", "checkpoint_every=100")).train()
    Trainer(tiny_config(cut_dir, train, "max_steps=5", "checkpoint_every=100"), resume="auto").train()
    full = {r["step"]: r["loss"] for r in read_log(full_dir)}
    resumed = {r["step"]: r["loss"] for r in read_log(cut_dir)}
    assert sorted(resumed) == [0, 1, 2, 3, 4]
    for step in range(5):
        assert resumed[step] == full[step], step
    a = torch.load(full_dir / "checkpoints" / "step_00000005.pt", weights_only=True)
    b = torch.load(cut_dir / "checkpoints" / "step_00000005.pt", weights_only=True)
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key


def test_nonfinite_loss_names_the_step(tmp_path, digits_betons, monkeypatch):
    train, _ = digits_betons
    original = DINOLoss.forward
    calls = {"n": 0}

    def poisoned(self, student, teacher, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, student, teacher, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DINOLoss, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        Trainer(tiny_config(tmp_path / "err", train, "max_steps=4")).train()
    # Checked without a host sync per step: found at the next log/checkpoint point, still naming
    # step 2, and nothing computed after it was logged or saved.
    calls["n"] = 0
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        Trainer(tiny_config(tmp_path / "deferred", train, "max_steps=6", "log_every=5")).train()
    assert [r["step"] for r in read_log(tmp_path / "deferred")] == [0]
    assert list_checkpoints(tmp_path / "deferred" / "checkpoints") == []
    calls["n"] = 0
    summary = Trainer(tiny_config(tmp_path / "skip", train, "max_steps=4", "on_nonfinite_loss=skip")).train()
    assert summary["steps"] == 4 and summary["skipped_steps"] == [2]
    assert [r["skipped"] for r in read_log(tmp_path / "skip")] == [False, False, True, False]


def test_bad_checkpoints_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="not a fastdino"):
        load_checkpoint(bad)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fastdino", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[], ["train"], ["demo"], ["data", "convert"], ["eval", "knn"], ["bench", "kernels"], ["bench", "loader"],
                                     ["viz", "attention"]])
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["train", "--config", "nope.yaml"], "config file not found"),
    (["train", "data.path=/nonexistent/x.beton"], "/nonexistent/x.beton"),
    (["train", "data.path=x", "optim.lr=fast"], "optim.lr"),
    (["eval", "knn", "missing.pt", "--train", "a", "--val", "b"], "checkpoint not found"),
])
def test_cli_errors_are_one_line(args, expected):
    result = run_cli(*args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("fastdino: error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]


def test_cli_train_runs(tmp_path, digits_betons):
    train, _ = digits_betons
    result = run_cli("train", *TINY, f"output_dir={tmp_path}", f"data.path={train}", "max_steps=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 2


def test_resume_from_a_checkpoint_of_another_launch_is_a_clear_error(tmp_path, digits_betons):
    """A DeepSpeed step folder cannot continue a one-process run (and the other way round)."""
    train, _ = digits_betons
    folder = tmp_path / "checkpoints" / "step_00000004"
    folder.mkdir(parents=True)
    torch.save({"version": 1, "step": 4, "parallel": {"world_size": 2, "zero_stage": 1}}, folder / "fastdino.pt")
    with pytest.raises(CheckpointError, match="written by a DeepSpeed run"):
        Trainer(tiny_config(tmp_path, train, "max_steps=5"), resume="auto")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_with_a_checkpoint_and_the_conventional_status(tmp_path, signum, status):
    """SIGINT / SIGTERM mid-run: a checkpoint at the next step boundary, the one-line message,
    and exit status 128 + signal, as a shell reports a death by that signal."""
    job = subprocess.Popen([sys.executable, "-m", "fastdino", "train", *TINY, f"output_dir={tmp_path}",
                            "data.path=synthetic", "max_steps=100000", "checkpoint_every=100000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "log.jsonl").exists():  # written after the first step: the handlers are in place
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-2000:]
        time.sleep(0.05)
    job.send_signal(signum)
    _, err = job.communicate(timeout=120)
    assert job.returncode == status, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("fastdino: ")]
    assert len(lines) == 1 and lines[0].startswith("fastdino: stopped: interrupted after step"), err[-2000:]
    assert f"`fastdino train --resume auto output_dir={tmp_path}`" in lines[0]  # what to type next
    assert len(list_checkpoints(tmp_path / "checkpoints")) == 1


def test_resume_auto_without_a_checkpoint_warns(tmp_path, caplog):
    """Kept (a requeued SLURM job starts this way), but said where it is seen: a warning."""
    with caplog.at_level(logging.WARNING):
        trainer = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", "data.path=synthetic"]), resume="auto")
    assert trainer.start_step == 0
    assert any(r.levelno == logging.WARNING and "no checkpoint" in r.getMessage() for r in caplog.records)


def test_a_second_signal_stops_at_once_with_its_status(tmp_path):
    trainer = Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", "data.path=synthetic"]))
    trainer._request_stop(signal.SIGTERM, None)  # the first only asks for a stop at the step boundary
    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer._request_stop(signal.SIGTERM, None)
    assert stopped.value.exit_status == 143
    assert "no checkpoint was written yet" in str(stopped.value)  # nothing to promise before the first one
    trainer.save(1)
    with pytest.raises(KeyboardInterrupt) as stopped:
        trainer._request_stop(signal.SIGTERM, None)
    assert f"the last checkpoint in {trainer.checkpoint_dir} is intact" in str(stopped.value)
    trainer.close()
