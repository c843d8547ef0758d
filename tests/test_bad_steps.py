"""on_nonfinite_loss=skip with a real bad input: one NaN pixel in a crop.

A skipped step must change nothing that outlives it (centre, head batch-norm statistics,
student, teacher, optimizer), so the run recovers; its log.jsonl record says it was
skipped and stays strict JSON. Several ranks skip together when only one sees the NaN.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastdino.parallel import SHARD_PICKLED_CLASSES
from fastdino.train.checkpoint import load_checkpoint
from fastdino.train.trainer import Trainer

from test_train import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent
BAD_STEP = 2


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def strict_records(run_dir):
    """log.jsonl as a strict JSON parser reads it (no NaN, Infinity)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=reject_constant) for line in lines]


def poison_step(monkeypatch, crop_index, step=BAD_STEP):
    """Wraps the trainer's batches: one NaN pixel in crop `crop_index` (0, 1 global; 2+ local) at `step`."""
    original = Trainer._batches

    def batches(self):
        for i, crops, labels in original(self):
            if i == step:
                crops = [c.clone() for c in crops]
                crops[crop_index][0, 0, 0, 0] = float("nan")
            yield i, crops, labels

    monkeypatch.setattr(Trainer, "_batches", batches)


def assert_same(a, b, where=""):
    """Nested state dicts (tensors, numbers, lists) equal exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_deferred_centre_update_is_the_official_one_applied_later():
    from fastdino.ssl import DINOLoss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)
    official = DINOLoss(16, 4, 0.04, 0.04, 0, 10, impl="torch")
    deferred = DINOLoss(16, 4, 0.04, 0.04, 0, 10, impl="torch", defer_center_update=True)
    assert torch.equal(official(student, teacher, 0), deferred(student, teacher, 0))
    assert torch.equal(deferred.center, torch.zeros(1, 16))  # nothing moved before the commit
    deferred.commit_center()
    assert torch.equal(deferred.center, official.center)
    with pytest.raises(RuntimeError, match="no forward"):
        deferred.commit_center()  # one forward, one update


@pytest.mark.parametrize("crop_index", [0, 2], ids=["global_crop", "local_crop"])
def test_nan_pixel_step_is_skipped_and_changes_nothing(tmp_path, digits_betons, monkeypatch, crop_index):
    """The state right after the skipped step equals the state of a run that stopped before it
    (head batch norm on, so its running statistics are covered too); later steps train on."""
    train, _ = digits_betons
    common = ["on_nonfinite_loss=skip", "model.use_bn_in_head=true"]
    Trainer(tiny_config(tmp_path / "clean", train, *common, f"max_steps={BAD_STEP}")).train()
    poison_step(monkeypatch, crop_index)
    summary = Trainer(tiny_config(tmp_path / "poisoned", train, *common, "max_steps=5",
                                  f"checkpoint_every={BAD_STEP + 1}", "keep_checkpoints=3")).train()

    assert summary["skipped_steps"] == [BAD_STEP]
    before = load_checkpoint(tmp_path / "clean" / "checkpoints" / f"step_{BAD_STEP:08d}.pt")
    after = load_checkpoint(tmp_path / "poisoned" / "checkpoints" / f"step_{BAD_STEP + 1:08d}.pt")
    assert any("running_mean" in key for key in before["student"]), "the head has no batch norm to check"
    for part in ("student", "teacher", "dino_loss"):
        assert_same(before[part], after[part], part)
    assert_same(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer.state")
    # lr and weight decay are set from the schedule at the start of every step, the skipped one included
    scheduled = ("lr", "weight_decay", "frozen")
    for a, b in zip(before["optimizer"]["param_groups"], after["optimizer"]["param_groups"]):
        assert_same({k: v for k, v in a.items() if k not in scheduled}, {k: v for k, v in b.items() if k not in scheduled})

    records = strict_records(tmp_path / "poisoned")
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    bad = records[BAD_STEP]
    assert bad["skipped"] is True and bad["loss"] is None
    assert not any(r["skipped"] for r in records if r["step"] != BAD_STEP)
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records if r["step"] != BAD_STEP)
    final = load_checkpoint(tmp_path / "poisoned" / "checkpoints" / "step_00000005.pt")
    assert torch.isfinite(final["dino_loss"]["center"]).all()
    assert all(torch.isfinite(v).all() for v in final["teacher"].values() if v.is_floating_point())
    assert summary["last"]["loss"] is not None


def test_skipped_steps_are_logged_between_log_steps(tmp_path, digits_betons, monkeypatch):
    """log_every=10 would pass over step 2: a skipped step always gets its record."""
    train, _ = digits_betons
    poison_step(monkeypatch, crop_index=1)
    Trainer(tiny_config(tmp_path, train, "on_nonfinite_loss=skip", "log_every=10", "max_steps=4")).train()
    assert [(r["step"], r["skipped"]) for r in strict_records(tmp_path)] == [(0, False), (2, True), (3, False)]


RANKS_CHILD = textwrap.dedent("""
    import sys
    from fastdino.config import load_config
    from fastdino.train.trainer import Trainer
    from test_bad_steps import BAD_STEP

    original = Trainer._batches
    def batches(self):  # only rank 1 sees the NaN
        for i, crops, labels in original(self):
            if i == BAD_STEP and self.dist.rank == 1:
                crops = [c.clone() for c in crops]
                crops[0][0, 0, 0, 0] = float("nan")
            yield i, crops, labels
    Trainer._batches = batches
    Trainer(load_config(None, sys.argv[1:])).train()
""")


def test_two_ranks_skip_together(tmp_path):
    """2 gloo ranks, a NaN on rank 1 only: both skip the step (one agreed decision) and go on."""
    script = tmp_path / "child.py"
    script.write_text(RANKS_CHILD)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29691", str(script), *TINY, f"output_dir={tmp_path / 'run'}",
                             "data.path=synthetic", "on_nonfinite_loss=skip", "max_steps=4"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count(f"non-finite loss on at least one rank at step {BAD_STEP}") == 2, result.stderr[-4000:]
    records = strict_records(tmp_path / "run")
    assert [(r["step"], r["skipped"]) for r in records] == [(0, False), (1, False), (2, True), (3, False)]
    assert records[3]["loss"] is not None
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004", shard_classes=SHARD_PICKLED_CLASSES)
    assert torch.isfinite(state["dino_loss"]["center"]).all()
