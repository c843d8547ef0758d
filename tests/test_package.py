"""SLOW (about 30 s): the wheel installs anywhere. It is built from this tree, installed into a fresh
venv in a temporary folder, and `fastdino train --config demo` runs there from a folder outside the
source tree, with the configs shipped inside the package.

The venv reuses this machine's installed dependencies (torch, numpy, omegaconf, ...) through a
`.pth` line naming the test interpreter's site-packages, as `--system-site-packages` would if they
lived in the system Python. Only fastdino comes from the wheel: a path a `.pth` file adds is
searched after the venv's own site-packages, and the editable install's finder there is not
activated (Python runs the `.pth` files of site directories only, not of paths they add).
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(command, **kwargs):
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.timeout(300)
def test_wheel_installs_and_trains_outside_the_source_tree(tmp_path):
    # Build artefacts go to tmp_path: a build/ folder in the tree would also keep files deleted since.
    extra_config = tmp_path / "build.cfg"
    extra_config.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n[egg_info]\negg_base = {tmp_path}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(extra_config)}
    env.pop("PYTHONPATH", None)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         REPO], env=env)
    wheel, = (tmp_path / "dist").glob("fastdino-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    venv_site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (venv_site / "machine_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    where = run([python, "-c", "import fastdino, fastdino.config as c; print(fastdino.__file__); print(c.CONFIG_DIR)"],
                cwd=workdir, env=env)
    package_file, config_dir = map(Path, where.stdout.split())
    assert package_file.is_relative_to(venv_site) and config_dir == venv_site / "fastdino" / "configs"
    assert (config_dir / "launch" / "slurm.sbatch").is_file()

    out = workdir / "run"
    trained = run([venv / "bin" / "fastdino", "train", "--config", "demo", "data.path=synthetic", "max_steps=2",
                   f"output_dir={out}", "progress=false"], cwd=workdir, env=env)
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["output_dir"] == str(out)
    assert (out / "checkpoints" / "step_00000002.pt").is_file()
    assert "arch: vit_tiny" in (out / "config.yaml").read_text()  # demo.yaml's model, found by name
