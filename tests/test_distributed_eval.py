"""k-NN evaluation over 2 ranks (torchrun, gloo on CPU) equals the single-process result."""
import subprocess
import sys

from fastdino.config import load_config
from fastdino.train.trainer import Trainer

from test_train import TINY


def test_knn_on_two_ranks_matches_one(tmp_path, digits_betons):
    train, val = digits_betons
    Trainer(load_config(None, [*TINY, f"output_dir={tmp_path}", f"data.path={train}", "max_steps=2"])).train()
    checkpoint = tmp_path / "checkpoints" / "step_00000002.pt"
    args = ["-m", "fastdino", "eval", "knn", str(checkpoint), "--train", str(train), "--val", str(val),
            "--k", "5", "20", "--device", "cpu"]
    single = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    double = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-3000:]
    lines = [line for line in single.stdout.splitlines() if "top-1" in line]
    assert len(lines) == 2 and [l for l in double.stdout.splitlines() if "top-1" in l] == lines
