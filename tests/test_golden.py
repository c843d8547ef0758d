"""The tiny CPU run's loss curve, checked in: a refactor that changes what a step computes fails here.

The run is bit-reproducible on one machine (seeded weights, data order, augmentations and drop
path); the tolerance only allows for another CPU's float rounding (vector width changes the order
of sums), far below what a changed step does to the curve. After an intended change of numerics,
rewrite the file with FASTDINO_WRITE_GOLDEN=1 and say why in the commit.
"""
import json
import os
from pathlib import Path

import pytest

from fastdino.config import load_config
from fastdino.train.trainer import Trainer

GOLDEN = Path(__file__).parent / "golden" / "tiny_digits_curve.json"
# test_train's TINY run, with stochastic depth and a head batch norm so that every part of the step counts.
TINY = ["device=cpu", "progress=false", "log_every=1", "seed=0", "model.arch=vit_tiny", "model.depth=2",
        "model.patch_size=4", "model.img_size=16", "model.out_dim=64", "model.head_hidden_dim=32",
        "model.head_bottleneck_dim=16", "model.use_bn_in_head=true", "model.drop_path_rate=0.1", "data.batch_size=16", "data.n_local_crops=2",
        "data.global_size=16", "data.local_size=8", "data.num_workers=1", "optim.epochs=2",
        "optim.lr=0.1", "optim.warmup_epochs=0", "optim.freeze_last_layer=0", "eval.eval_size=16", "max_steps=8",
        "checkpoint_every=100"]
FIELDS = ("loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy", "student_entropy")


def test_tiny_run_follows_the_golden_curve(tmp_path, digits_betons):
    train, _ = digits_betons
    cfg = load_config(None, [*TINY, f"output_dir={tmp_path}", f"data.path={train}"])
    Trainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    curve = {field: [r[field] for r in records if r.get("kind") != "eval"] for field in FIELDS}
    if os.environ.get("FASTDINO_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"config": TINY, **curve}, indent=1) + "\n")
        pytest.skip(f"wrote {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert golden["config"] == TINY, "the golden file was written for another config: rewrite it"
    for field in FIELDS:
        assert curve[field] == pytest.approx(golden[field], rel=1e-5, abs=1e-7), field
