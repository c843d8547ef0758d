import math

import numpy as np
import pytest

from fastdino.config import load_config
from fastdino.ssl.loss import teacher_temperature_schedule
from fastdino.train.schedules import build_schedules, cosine_schedule


def test_cosine_schedule_known_values():
    s = cosine_schedule(1.0, 0.0, epochs=4, steps_per_epoch=10, warmup_epochs=1)
    assert len(s) == 40
    assert s[0] == 0.0 and s[9] == pytest.approx(1.0)          # linear warm-up over 10 steps
    assert s[10] == pytest.approx(1.0)                          # cosine starts at the peak
    assert s[10 + 15] == pytest.approx(0.5)                     # halfway through the cosine
    assert s[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 29 / 30)))
    assert np.all(np.diff(s[10:]) <= 0)


def test_official_schedules_from_config():
    cfg = load_config(None, ["data.path=x"])  # 100 epochs, 10 warm-up, lr 5e-4 per 256
    sched = build_schedules(cfg, steps_per_epoch=100, total_batch_size=512)
    assert sched.total_steps == 100 * 100
    assert sched.lr[0] == 0.0 and sched.lr[999] == pytest.approx(0.001)   # 5e-4 * 512/256
    assert sched.lr[-1] == pytest.approx(1e-6, rel=1e-3)
    assert sched.weight_decay[0] == pytest.approx(0.04) and sched.weight_decay[-1] == pytest.approx(0.4, rel=1e-4)
    assert sched.momentum[0] == pytest.approx(0.996) and sched.momentum[-1] == pytest.approx(1.0, abs=1e-8)
    values = sched.at(250)
    assert values["epoch"] == 2 and values["teacher_temp"] == pytest.approx(0.04)


def test_teacher_temperature_warmup():
    temps = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(temps) == 100
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07) and temps[99] == pytest.approx(0.07)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)


def test_warmups_as_long_as_the_run_reach_their_targets():
    """The longest warm-ups the config allows (optim.epochs) end on their target values."""
    cfg = load_config(None, ["data.path=x", "optim.epochs=3", "optim.warmup_epochs=3",
                             "dino.warmup_teacher_temp_epochs=3", "dino.teacher_temp=0.07"])
    sched = build_schedules(cfg, steps_per_epoch=10, total_batch_size=256)
    assert sched.lr[-1] == pytest.approx(cfg.optim.lr) and sched.lr[0] == 0.0
    assert sched.at(29)["teacher_temp"] == pytest.approx(0.07)
