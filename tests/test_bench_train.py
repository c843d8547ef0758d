"""`fastdino bench train` runs end to end on the CPU at tiny size: JSON rows and profile traces."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_bench_train_tiny_cpu_rows_and_traces(tmp_path):
    out, traces = tmp_path / "rows.jsonl", tmp_path / "traces"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "fastdino", "bench", "train", "--preset", "tiny", "--device", "cpu", "--steps", "2",
         "--warmup", "1", "--breakdown-steps", "1", "--profile", str(traces), "--profile-steps", "1",
         "--json", str(out), "data.batch_size=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fastdino / official:" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_what = {(row["what"], row["unit"]): row for row in rows}
    tag = "vit_tiny8_d2_B3_2x32+4x16_K1024"
    for variant in ("fastdino", "official"):
        throughput = by_what[(f"train_step/{tag}/{variant}/throughput", "img/s")]
        step_ms = by_what[(f"train_step/{tag}/{variant}/step_time", "ms")]["value"]
        assert throughput["batch_size"] == 3 and throughput["precision"] == "fp32"
        assert throughput["value"] == pytest.approx(3 * 1000 / step_ms, rel=1e-6)  # one clock, two views
        stages = {stage: by_what[(f"train_step/{tag}/{variant}/breakdown/{stage}", "ms")]["value"]
                  for stage in ("data_wait", "teacher_forward", "student_forward", "loss", "backward", "optimizer",
                                "ema")}
        # every compute stage was timed (a stage the step skipped would read 0), data_wait may round to 0
        assert min(v for k, v in stages.items() if k != "data_wait") > 0 and stages["data_wait"] >= 0
        trace = json.loads((traces / f"{tag}_{variant}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert {"student_forward", "backward", "ema"} <= names
    assert by_what[(f"train_step/{tag}/fastdino/throughput", "img/s")]["attn_backend"] == "sdpa"
    assert by_what[(f"train_step/{tag}/official/throughput", "img/s")]["attn_backend"] == "math"
    assert any(row["what"] == f"train_step/{tag}/speedup" for row in rows)
    for row in rows:
        assert {"device", "torch", "triton", "date", "command"} <= row.keys()
        assert row["command"].startswith("fastdino bench train --preset tiny")


def test_bench_train_on_a_beton(tmp_path, digits_betons):
    """--data PATH feeds both variants from the real loader (16-px digits, so 16/8-px crops)."""
    out = tmp_path / "rows.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "fastdino", "bench", "train", "--preset", "tiny", "--device", "cpu", "--steps", "2",
         "--warmup", "1", "--breakdown-steps", "1", "--data", str(digits_betons[0]), "--json", str(out),
         "data.batch_size=4", "data.global_size=16", "data.local_size=8", "model.img_size=16"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    throughput = [row for row in rows if row["what"].endswith("/throughput")]
    assert len(throughput) == 2 and all(row["data"] != "synthetic" and row["value"] > 0 for row in throughput)


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.beton"], "no such file"),
    (["model.arch=vit_huge"], "model.arch"),
])
def test_bench_train_bad_input_is_one_line(args, message, monkeypatch, capsys):
    from fastdino.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the bench command replaces sys.argv
    # ... and adds a console log handler bound to this test's captured stderr: drop it afterwards.
    monkeypatch.setattr(logging.getLogger(), "handlers", list(logging.getLogger().handlers))
    try:
        code = main(["bench", "train", "--preset", "tiny", *args])
    except SystemExit as exit_:
        code, err = 1, str(exit_.code)
    else:
        err = capsys.readouterr().err
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bench_and_trainer_run_the_same_step(tmp_path, monkeypatch):
    """`fastdino bench train` times fastdino.ssl.DINOMetaArch.train_step, the call the trainer makes
    every step, built by the same builder: counted on both sides."""
    import runpy

    import torch

    from fastdino.config import load_config
    from fastdino.ssl import DINOMetaArch
    from fastdino.train.trainer import Trainer

    calls = []
    original = DINOMetaArch.train_step

    def counted(self, *args, **kwargs):
        calls.append(type(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DINOMetaArch, "train_step", counted)
    bench = runpy.run_path(str(REPO / "bench" / "bench_train.py"))
    tiny = [*bench["TINY"][0], "data.path=synthetic", "data.batch_size=2", "device=cpu", "progress=false"]
    cfg = load_config(None, tiny)
    step = bench["FastdinoStep"](cfg, torch.device("cpu"))
    step(next(iter(bench["SyntheticData"](cfg, torch.device("cpu")))), bench["NoStages"]())
    assert calls == [DINOMetaArch]
    Trainer(load_config(None, [*tiny, f"output_dir={tmp_path}", "max_steps=2"])).train()
    assert calls == [DINOMetaArch] * 3
