"""The bench scripts as a user outside this project meets them: what they need said in one
line (FFCV for the .beton loader pipelines, DeepSpeed for `bench memory --measure`), options
that do not apply refused, help in plain terms, and bench/gpu_wheels.sh's output without
pip's noise, its errors kept."""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_optional_packages import run_without_ffcv_and_deepspeed

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

SMALL_LOADER = ["--images", "4", "--workers", "1", "--batch-size", "2", "--local-crops", "1", "--global-size", "32",
                "--local-size", "16"]


@pytest.mark.parametrize("only", [["--only", "pil"], []])
def test_the_pil_loader_runs_without_ffcv(only):
    result = run_without_ffcv_and_deepspeed("bench", "loader", *SMALL_LOADER, *only)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pil (official DataAugmentationDINO recipe" in result.stdout
    if not only:  # the FFCV pipelines say why they did not run, and how to get them
        line = next(line for line in result.stdout.splitlines() if line.startswith("PIL pipeline only: "))
        assert "needs ffcv" in line and "pip install ffcv==1.0.2" in line and "fastdino[ffcv]" in line


def test_an_ffcv_loader_pipeline_without_ffcv_is_one_line():
    result = run_without_ffcv_and_deepspeed("bench", "loader", *SMALL_LOADER, "--only", "fastdino")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench loader --only fastdino needs ffcv"), result.stderr[-2000:]
    assert "apt-get install pkg-config libturbojpeg0-dev libopencv-dev && pip install ffcv==1.0.2" in lines[0]


def test_bench_memory_measure_without_deepspeed_says_so_first():
    result = run_without_ffcv_and_deepspeed("bench", "memory", "--measure", "--arch", "vit_tiny")
    assert result.returncode == 1 and result.stdout == ""  # before the analytic table
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench memory --measure needs deepspeed"), result.stderr[-2000:]
    assert "pip install deepspeed" in lines[0]


def test_bench_kernels_report_is_named_and_refuses_options_it_would_ignore():
    usage = subprocess.run([sys.executable, "-m", "fastdino", "bench", "kernels", "--report", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: fastdino bench kernels --report ")
    for before in (["--device", "cpu"], ["--tiny", "--batches", "2"]):
        result = subprocess.run([sys.executable, "-m", "fastdino", "bench", "kernels", *before, "--report"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        error = result.stderr.strip().splitlines()[-1]
        assert error.startswith("fastdino bench kernels: error: ") and "after --report" in error
        assert all(option in error for option in before if option.startswith("--"))


@pytest.mark.parametrize("script", ["gpu_suite.py", "kernel_report.py", "bench_train.py"])
def test_help_is_in_terms_a_user_outside_this_project_knows(script):
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for internal in ("device tool", "carry", "travel", "/work/", "the issue", "this project", "$OUT"):
        assert internal not in result.stdout, (script, internal)


def test_gpu_wheels_help_is_in_plain_terms():
    result = subprocess.run(["bash", str(BENCH / "gpu_wheels.sh"), "--help"], capture_output=True, text=True,
                            check=True)
    assert "copy the\nrepository with .whl/ to the GPU machine" in result.stdout
    for internal in ("device tool", "carry", "travel", "CI image", "this project"):
        assert internal not in result.stdout, internal


# A `python` whose pip warns as a pip configuration with missing find-links folders does, and
# fails at `pip wheel` when told to; anything else goes to the real interpreter.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then
  echo "WARNING: Location 'file:///nowhere/simple/$3/' is ignored: it is neither a file nor a directory." >&2
  if [ "$3" = wheel ] && [ -n "$FAIL_WHEEL" ]; then echo "ERROR: No matching distribution found" >&2; exit 1; fi
  exit 0
fi
exec {python} "$@"
"""


@pytest.mark.parametrize("fail", [False, True])
def test_gpu_wheels_drops_pips_ignored_location_warnings_and_keeps_its_errors(tmp_path, fail):
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PYTHON": str(python), **({"FAIL_WHEEL": "1"} if fail else {})}
    result = subprocess.run(["bash", str(BENCH / "gpu_wheels.sh"), "--no-ffcv", "--dest", str(tmp_path / "wheels")],
                            env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert "is ignored" not in output and "downloading" in output
    if fail:
        assert result.returncode == 1 and "ERROR: No matching distribution found" in output
    else:
        assert result.returncode == 0, output
        assert "total of 0 wheels" in output and "to copy to the GPU machine (kept under 64 MiB)" in output
