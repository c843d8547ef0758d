"""What works where FFCV or DeepSpeed cannot be imported (some GPU hosts cannot build FFCV).

Each case runs `fastdino` in a child process whose import system refuses `ffcv` and
`deepspeed` (as on a machine where they are not installed): the models, the SSL
modules, the kernels, training on `data.path=synthetic` and the kernel and training
benchmarks work; a .beton, `data convert` or ZeRO asked for there is one line that
names the missing package and how to install it.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=4", "model.img_size=16", "model.out_dim=64",
              "model.head_hidden_dim=32", "model.head_bottleneck_dim=16", "data.batch_size=4",
              "data.n_local_crops=2", "data.global_size=16", "data.local_size=8", "progress=false", "device=cpu"]

CHILD = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("ffcv", "deepspeed"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Refuse())
    if sys.argv[1] == "--import":
        import fastdino.data, fastdino.data.multicrop, fastdino.data.synthetic, fastdino.models, fastdino.ssl
        import fastdino.parallel, fastdino.train.trainer, fastdino_kernels.dino_loss, fastdino_kernels.ema
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ffcv", "deepspeed"))
        print("imported", leaked)
        sys.exit(1 if leaked else 0)
    from fastdino.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def run_without_ffcv_and_deepspeed(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", CHILD, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_models_ssl_kernels_and_trainer_import():
    result = run_without_ffcv_and_deepspeed("--import")
    assert result.returncode == 0 and "imported []" in result.stdout, result.stdout + result.stderr[-3000:]


def test_train_on_synthetic_data(tmp_path):
    result = run_without_ffcv_and_deepspeed("train", *TINY_MODEL, "data.path=synthetic", "max_steps=2",
                                            f"output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"steps": 2' in result.stdout
    assert (tmp_path / "checkpoints" / "step_00000002.pt").is_file()


def test_bench_kernels_and_bench_train(tmp_path):
    kernels = run_without_ffcv_and_deepspeed("bench", "kernels", "--device", "cpu", "--tiny", "--batches", "2",
                                             "--dtypes", "fp32", "--skip-compile")
    assert kernels.returncode == 0, kernels.stdout[-2000:] + kernels.stderr[-3000:]
    train = run_without_ffcv_and_deepspeed("bench", "train", "--preset", "tiny", "--device", "cpu", "--steps", "1",
                                           "--warmup", "0", "--breakdown-steps", "1", "--json", str(tmp_path / "t.jsonl"))
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert "fastdino / official" in train.stdout


@pytest.mark.parametrize("args, package, install", [
    (["train", "data.path=train.beton"], "ffcv", "pip install ffcv==1.0.2"),
    (["data", "convert", "images", "out.beton"], "ffcv", "pip install ffcv==1.0.2"),
    (["train", "data.path=synthetic", "parallel.zero_stage=1", "max_steps=1"], "deepspeed", "pip install deepspeed"),
])
def test_missing_package_is_one_clear_line(tmp_path, args, package, install):
    (tmp_path / "train.beton").write_bytes(b"")  # a file that exists: what is missing is the package
    result = run_without_ffcv_and_deepspeed(*args, *(TINY_MODEL if args[0] == "train" else []),
                                            *([f"output_dir={tmp_path}"] if args[0] == "train" else []), cwd=tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastdino: error")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"needs {package}" in errors[0] and install in errors[0], errors[0]


def test_a_missing_beton_is_named_before_the_missing_package(tmp_path):
    result = run_without_ffcv_and_deepspeed("train", *TINY_MODEL, "data.path=absent.beton", f"output_dir={tmp_path}",
                                            cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fastdino: error")]
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-3000:]
    assert "absent.beton: no such .beton file" in errors[0]
