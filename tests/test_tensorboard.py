"""TensorBoard events of a run (`logging.tensorboard`): the log.jsonl scalars, k-NN and the
attention picture, read back with TensorBoard's own reader; a one-line note where it is missing."""
import json
import logging
import sys

import pytest

from fastdino.config import load_config
from fastdino.train.trainer import Trainer

from test_train import TINY

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_scalars_knn_and_attention_picture(tmp_path, digits_betons):
    train, val = digits_betons
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", f"data.path={train}", "max_steps=4", "eval.knn_every=2",
                             f"eval.knn_train_path={train}", f"eval.knn_val_path={val}", "eval.knn_k=5"])
    Trainer(cfg).train()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r.get("kind") != "eval"}
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged.keys() == losses.keys()
    assert all(logged[step] == pytest.approx(losses[step], rel=1e-6) for step in losses)
    for tag in ("train/lr", "train/teacher_temp", "train/img_per_s", "train/teacher_entropy", "knn/top1"):
        assert tag in tags["scalars"], tag
    knn_steps = sorted(r["step"] for r in records if r.get("kind") == "eval")
    assert [e.step for e in events.Scalars("knn/top1")] == knn_steps == [0, 2, 4]
    pictures = events.Images("attention/last_block_heads")
    assert [p.step for p in pictures] == knn_steps
    heads = 3  # vit_tiny
    assert pictures[0].width == (heads + 1) * pictures[0].height  # the photo, then one panel per head


def test_missing_tensorboard_is_one_note(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as where it is not installed
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", "data.path=synthetic", "max_steps=1",
                             "optim.warmup_epochs=0"])
    with caplog.at_level(logging.WARNING):
        Trainer(cfg).train()
    notes = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(notes) == 1 and "pip install tensorboard" in notes[0]
    assert not (tmp_path / "tensorboard").exists()
