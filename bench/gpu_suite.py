"""One command that measures fastdino on a CUDA GPU, section by section, inside a time budget.

    python bench/gpu_suite.py --out DIR                        # every section, 510 s in all
    python bench/gpu_suite.py --out DIR --only env kernels     # some sections
    python bench/gpu_suite.py --out DIR --budget 300

On a GPU machine without internet access: run bash bench/gpu_wheels.sh on a machine with a
package index (it fetches what the GPU machine lacks into .whl/), copy the repository with
.whl/ to the GPU machine and run python3 bench/gpu_suite.py --out DIR there.

Sections, in order of value; each runs in processes of its own with a time limit, so a crash
or a hang loses that section only, and each says what it skipped and why:

  env            the environment (device, driver, versions, which fast paths run here and why)
                 and the two ceilings: device-to-device copy bandwidth (bytes read + written)
                 and the bf16 matmul rate (8192^3, random data)
  cuda_tests     the tests that run on CUDA: the Triton kernels, GPU decode and crops, xformers,
                 the GPU configuration trained end to end
  kernels        bench/bench_kernels.py: the fused DINO loss against the official-style eager loss,
                 torch.compile and the byte floor; the EMA kernel against torch._foreach_lerp_
                 (bf16 at B = 64 and 128, then fp32)
  train_step     bench/bench_train.py: fastdino's step against the official-style step on the same
                 inputs, 2 x 224 + 10 x 96 crops, K = 65536: ViT-S/16 and ViT-B/16 at B = 128, then
                 B = 64 (img/s, MFU, peak memory, step breakdown)
  loader         bench/bench_loader.py: nvJPEG decode + batched multi-crop (bf16) of ImageNet-like
                 JPEGs held in memory, without FFCV (img/s, CPU cores used); then the FFCV loader
                 over a .beton where FFCV imports
  kernel_report  bench/kernel_report.py: registers, spills and occupancy of the Triton kernels as
                 this machine's Triton compiles them for sm_90 (needs no GPU)

Each section has a nominal share of the budget (SECTIONS); time one leaves unused goes to the
next. env gets at least its share, as every other section depends on what it finds. DIR gets
rows.jsonl (one JSON object per measurement, written as each process ends: what, value, unit,
section, device, versions, date, command), suite.log (everything the processes printed) and
summary.txt (the table printed last). Each run starts these three files afresh (other files in
DIR are left alone), so they always describe one run.

Ctrl-C (SIGINT) or SIGTERM stops the running section's processes, marks it interrupted, writes
the summary of what ran and exits 130 (SIGINT) or 143 (SIGTERM).

Bare machine: where the --wheels folder (default .whl/) holds wheels of packages this Python
lacks, or has older, they are installed first with pip --no-index --no-deps into --site
(default /tmp/site), and the sections run with PYTHONPATH=<site>:<repo>:<shim>, the shim being
a folder with a link fastdino_kernels -> <repo>/kernels, so nothing needs installing the
repository. --no-install uses neither the wheels nor the site folder. Without CUDA (e.g. on a
CPU machine) the env and kernel_report sections run and every GPU section is recorded as
skipped, and the suite exits 0.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

# (name, nominal seconds): the order they run in, most valuable first; 490 s in all, so the
# default 510 s budget leaves the wheels' installation and the summary room.
SECTIONS = (("env", 40), ("cuda_tests", 80), ("kernels", 110), ("train_step", 170), ("loader", 60),
            ("kernel_report", 30))
DEFAULT_BUDGET_S = 510.0
# Less cannot give env its time, and without env no other section knows whether CUDA is here.
MIN_BUDGET_S = 30.0
# Sections that run without CUDA: kernel_report compiles for sm_90 and runs nothing.
NO_GPU_NEEDED = ("env", "kernel_report")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
CHILD_ENV = "--child-env"  # argv[1] of the env section's own process
KILL_GRACE_S = 5.0  # after SIGTERM, before SIGKILL
SUMMARY_RESERVE_S = 5.0  # kept back from the last step for merging rows and printing the summary

# The tests that use CUDA where it is present (the others are CPU tests the CI machine runs),
# quick ones first: a section cut short by its time limit keeps the outcomes printed so far.
CUDA_TESTS = ("tests/test_gpu_decode.py", "tests/test_models.py::test_xformers_on_cuda_matches_math",
              "tests/test_packed.py::test_packed_xformers_on_cuda_matches_per_resolution",
              "tests/test_packed.py::test_class_token_readout_with_xformers_on_cuda_matches_the_full_last_block",
              "tests/test_kernels_ema.py", "tests/test_kernels_dino_loss.py", "tests/test_gpu_config.py")
# bench_train.py's H100 matrix, the targets' batch first (its targets are at B = 128).
TRAIN_CONFIGS = (("vit_small", 128, 45), ("vit_base", 128, 55), ("vit_small", 64, 33), ("vit_base", 64, 37))
TRAIN_STEPS = ["--steps", "20", "--warmup", "5", "--breakdown-steps", "5"]
# Distributions whose versions the env section reports (OpenCV's comes from cv2: its wheel has several names).
DISTRIBUTIONS = ("torch", "triton", "numpy", "numba", "xformers", "omegaconf", "deepspeed", "nvidia-nvimgcodec-cu13",
                 "nvidia-nvjpeg", "ffcv", "pillow")


# ---------------------------------------------------------------- what each section runs

def cuda_test_args() -> list[str]:
    """pytest's arguments for the cuda_tests section (-v: a line per test as it ends; -ra: the skip reasons)."""
    return ["-m", "pytest", "-v", "-ra", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-o",
            "timeout=300", *CUDA_TESTS]


def section_steps(section: str, ffcv_imports: bool) -> list[tuple[str, Path, list[str], float]]:
    """(label, script, arguments before --json, nominal seconds) of the benchmark steps of a section."""
    if section == "kernels":
        script = BENCH / "bench_kernels.py"
        return [("kernels_bf16", script, ["--dtypes", "bf16", "--batches", "64", "128"], 65),
                ("kernels_fp32", script, ["--dtypes", "fp32", "--batches", "64", "128"], 45)]
    if section == "train_step":
        return [(f"train_{arch}16_B{batch}", BENCH / "bench_train.py",
                 [*TRAIN_STEPS, f"model.arch={arch}", "model.patch_size=16", f"data.batch_size={batch}",
                  "data.n_local_crops=10", "data.global_size=224", "data.local_size=96", "model.out_dim=65536"],
                 nominal) for arch, batch, nominal in TRAIN_CONFIGS]
    if section == "loader":
        script, common = BENCH / "bench_loader.py", ["--batch-size", "128", "--workers", "4"]
        steps = [("loader_gpu_bytes", script, [*common, "--only", "gpu-bytes", "--images", "2048"], 30)]
        if ffcv_imports:
            steps.append(("loader_ffcv_gpu", script, [*common, "--only", "gpu", "--images", "1024"], 30))
        return steps
    if section == "kernel_report":
        return [("kernel_report", BENCH / "kernel_report.py", [], 30)]
    raise ValueError(f"section {section!r} has no benchmark steps")


# ---------------------------------------------------------------- pure logic (tested on the CPU)

def allot(remaining: float, nominal: float, later: float) -> float:
    """Seconds for the next step: its nominal share and whatever time earlier steps left unused,
    keeping the later steps' nominal total (`later`) back; when less than all nominal time is
    left, every step gets the same fraction of its nominal share."""
    if remaining <= 0:
        return 0.0
    if remaining >= nominal + later:
        return remaining - later
    return remaining * nominal / (nominal + later)


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """(normalized distribution name, version) from a wheel's file name."""
    parts = Path(filename).name.split("-")
    return normalize(parts[0]), parts[1]


def version_key(version: str) -> tuple:
    """A sortable key of a version's leading numbers (1.2.10 > 1.2.9); the rest is ignored."""
    numbers = re.match(r"[\d.]*", version).group(0).strip(".")
    return tuple(int(n) for n in numbers.split(".") if n)


def wheels_to_install(wheels: list[str], installed: dict[str, str],
                      supported=None) -> tuple[list[str], list[str]]:
    """(wheels to install, one line per wheel left out and why). A wheel is installed where its
    distribution is missing or older here; `installed` maps normalized names to versions;
    `supported(filename)` says whether pip can install that wheel on this Python and platform."""
    chosen, notes = [], []
    for wheel in sorted(wheels):
        name, version = wheel_name_version(wheel)
        have = installed.get(name)
        if supported is not None and not supported(wheel):
            notes.append(f"{Path(wheel).name}: not for this Python or platform")
        elif have is not None and version_key(have) >= version_key(version):
            notes.append(f"{Path(wheel).name}: {name} {have} is here")
        else:
            chosen.append(wheel)
    return chosen, notes


def pip_install_command(python: str, wheels: list[str], site: str) -> list[str]:
    """pip's command that installs `wheels` into the folder `site`, offline and without dependencies."""
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", site, *wheels]


def make_row(what: str, value, unit: str, section: str, common: dict, **extra) -> dict:
    """One measurement: what, value, unit, the section, then `common` (device, versions, date, command)."""
    return {"what": what, "value": value, "unit": unit, "section": section, **extra, **common}


# `pytest -v` prints one line per test as it ends; `-ra` (pytest.ini) a summary with the skip reasons.
PYTEST_LINE = re.compile(r"^(tests/\S+?::.+?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)(?: \(.*\))?(?:\s+\[.*\])?\s*$")
PYTEST_SKIP_SUMMARY = re.compile(r"^SKIPPED \[(\d+)\] \S+?:\d+: (.*)$")
PYTEST_COLLECTION_ERROR = re.compile(r"^ERROR (tests/[^:\s]+\.py)(?: - .*)?$")


def parse_pytest(output: str) -> dict:
    """Outcomes from `pytest -v -ra` output: {'passed': n, ..., 'failed_ids': [...], 'skip_reasons': {reason: n}}."""
    counts = collections.Counter()
    failed, skips = [], collections.Counter()
    for line in output.splitlines():
        if match := PYTEST_LINE.match(line.rstrip()):
            nodeid, outcome = match.groups()
            counts[outcome.lower()] += 1
            if outcome in ("FAILED", "ERROR"):
                failed.append(nodeid)
        elif match := PYTEST_SKIP_SUMMARY.match(line.rstrip()):
            skips[match.group(2)] += int(match.group(1))
        elif match := PYTEST_COLLECTION_ERROR.match(line.rstrip()):
            counts["error"] += 1
            failed.append(match.group(1) + " (collection)")
    return {"passed": counts["passed"], "failed": counts["failed"], "skipped": counts["skipped"],
            "errors": counts["error"], "failed_ids": failed, "skip_reasons": dict(skips)}


def _value(rows: list[dict], what: str, unit: str | None = None):
    for row in reversed(rows):  # the newest
        if row.get("what") == what and (unit is None or row.get("unit") == unit):
            return row.get("value")
    return None


def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:{spec}}{suffix}"


def summary_lines(rows: list[dict], statuses: list[dict], total_s: float) -> list[str]:
    """The table printed last: each section's status, then the main numbers from the rows."""
    lines = ["", "=" * 30 + " fastdino GPU suite: summary " + "=" * 30]
    env = {row["what"][4:]: row for row in rows if row.get("what", "").startswith("env/")}
    if "device" in env:
        lines.append(f"device: {env['device']['value']}")
    versions = [f"{key[8:]} {env[key]['value']}" for key in env if key.startswith("version/")]
    if versions:
        lines.append("versions: " + ", ".join(versions))
    for key in [k for k in env if k.startswith("fast_path/")]:
        lines.append(f"fast path {key[10:]}: {env[key]['value']} ({env[key].get('detail', '')})")
    copy, matmul = _value(rows, "ceiling/copy_bandwidth"), _value(rows, "ceiling/bf16_matmul")
    if copy is not None or matmul is not None:
        lines.append(f"ceilings: copy {_fmt(copy, '.0f')} GB/s (read + write), "
                     f"bf16 matmul {_fmt(matmul, '.0f')} TFLOP/s")
    lines.append("")
    lines.append(f"{'section':<14} {'seconds':>8} {'rows':>5}  status")
    for status in statuses:
        count = sum(1 for row in rows if row.get("section") == status["section"])
        lines.append(f"{status['section']:<14} {status['seconds']:>8.1f} {count:>5}  {status['status']}")
        if status.get("detail"):
            lines.append(f"{'':<30}{status['detail']}")
    lines += _kernel_lines(rows) + _train_lines(rows) + _loader_lines(rows) + _report_lines(rows)
    lines.append(f"\ntotal {total_s:.0f} s; rows in rows.jsonl, output in suite.log")
    return lines


def _kernel_lines(rows: list[dict]) -> list[str]:
    loss = sorted({tuple(row["what"].split("/")[3:]) for row in rows
                   if row.get("what", "").startswith("dino_loss/fwd+bwd/triton/")})
    lines = []
    if loss:
        lines += ["", "DINO loss fwd+bwd, us (GB/s)   triton      eager    compile      floor"]
        for shape in loss:  # (B.., crops.., K.., dtype)
            tail = "/".join(shape)
            cells = []
            for impl in ("triton", "eager", "compile", "floor"):
                us = _value(rows, f"dino_loss/fwd+bwd/{impl}/{tail}", "us")
                cells.append(f"{_fmt(us, '.0f'):>10}")
            lines.append(f"  {tail:<28}" + " ".join(cells))
    ema = sorted({row["what"].split("/")[2] for row in rows if row.get("what", "").startswith("ema/triton/")})
    for params in ema:
        cells = {impl: _value(rows, f"ema/{impl}/{params}/fp32", "us") for impl in ("triton", "foreach", "floor")}
        lines.append(f"EMA {params}: triton {_fmt(cells['triton'], '.0f')} us, foreach {_fmt(cells['foreach'], '.0f')} "
                     f"us, floor {_fmt(cells['floor'], '.0f')} us")
    return lines


def _train_lines(rows: list[dict]) -> list[str]:
    tags = list(dict.fromkeys(row["what"].split("/")[1] for row in rows
                              if row.get("what", "").startswith("train_step/") and row["what"].count("/") >= 3))
    if not tags:
        return []
    lines = ["", f"{'training step':<40} {'fastdino':>9} {'official':>9} {'speedup':>8} {'MFU':>6} {'mem ratio':>9}"]
    for tag in tags:
        fast = _value(rows, f"train_step/{tag}/fastdino/throughput")
        official = _value(rows, f"train_step/{tag}/official/throughput")
        mfu = _value(rows, f"train_step/{tag}/fastdino/mfu")
        lines.append(f"{tag:<40} {_fmt(fast):>9} {_fmt(official):>9} "
                     f"{_fmt(_value(rows, f'train_step/{tag}/speedup'), '.2f', 'x'):>8} "
                     f"{_fmt(mfu * 100 if isinstance(mfu, float) else None, '.1f', '%'):>6} "
                     f"{_fmt(_value(rows, f'train_step/{tag}/memory_ratio'), '.2f'):>9}")
    lines.append("  (img/s; MFU of fastdino against 800 TFLOP/s bf16; peak memory fastdino / official)")
    return lines


def _report_lines(rows: list[dict]) -> list[str]:
    """Per Triton kernel and logits dtype: the range of registers per thread over the launches
    bench/kernel_report.py compiled, the most spill bytes, the fewest resident blocks per SM."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("what", "").startswith("kernel_report/") and row.get("unit") == "registers/thread":
            groups.setdefault((row["what"].split("/")[1], row.get("dtype")), []).append(row)
    lines = []
    for (kernel, dtype), group in groups.items():
        registers = [r["value"] for r in group]
        spills = max(r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0) for r in group)
        blocks = min(r.get("blocks_per_sm", 0) for r in group)
        lines.append(f"{kernel:<20} {dtype:<5} {min(registers)}-{max(registers)} registers, spills up to {spills} B, "
                     f">= {blocks} blocks/SM ({len(group)} launches)")
    return ["", "Triton kernels as compiled here (bench/kernel_report.py):"] + lines if lines else []


def _loader_lines(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        what = row.get("what", "")
        if what.startswith("loader ") and what.endswith(", img_per_s"):
            stem = what[: -len(", img_per_s")]
            cores = _value(rows, stem + ", cores_used")
            lines.append(f"{stem[7:]}: {_fmt(row['value'])} img/s on {_fmt(cores, '.2f')} CPU cores")
    return [""] + lines if lines else []


# ---------------------------------------------------------------- the environment child

def child_env(out: Path) -> None:
    """The env section, run in its own process: writes {'rows', 'cuda', 'device', 'versions', 'ffcv'}
    to `out` after every item, so whatever it learnt before a crash or a hang is kept."""
    import importlib
    import importlib.metadata
    import platform

    # cuda stays None until torch answers: a child that dies before then has not checked it.
    info = {"rows": [], "cuda": None, "device": "unknown", "versions": {}, "ffcv": "not checked"}

    def row(what, value, unit="", **extra):
        info["rows"].append({"what": what, "value": value, "unit": unit, **extra})
        out.write_text(json.dumps(info))

    def one_line(error: BaseException) -> str:
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}"[:300]

    row("env/python", platform.python_version())
    row("env/platform", platform.platform())
    row("env/cpu_cores", os.cpu_count(), "cores")
    for dist in DISTRIBUTIONS:
        try:
            row(f"env/version/{dist}", importlib.metadata.version(dist))
        except importlib.metadata.PackageNotFoundError:
            row(f"env/version/{dist}", "not installed")
    try:
        row("env/version/opencv", importlib.import_module("cv2").__version__)
    except Exception as error:  # noqa: BLE001  (missing, or its compiled part fails to load)
        row("env/version/opencv", f"not importable ({one_line(error)})")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    row("env/git_revision", git.stdout.strip() if git.returncode == 0 else "unknown (no git here)")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        row("env/nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
    except (OSError, subprocess.TimeoutExpired) as error:
        row("env/nvidia_smi", f"not run ({one_line(error)})")

    import torch

    info["cuda"] = torch.cuda.is_available()
    info["versions"] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["versions"]["triton"] = triton.__version__
    except ImportError:
        info["versions"]["triton"] = None
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["device"] = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                          f"sm_{props.major}{props.minor})")
    else:
        info["device"] = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores), no CUDA"
    row("env/device", info["device"])
    row("env/cuda_available", info["cuda"])
    device = torch.device("cuda" if info["cuda"] else "cpu")

    def fast_path(name, check):
        try:
            reason = check()
            row(f"env/fast_path/{name}", "no" if reason else "yes", detail=reason or "runs here")
        except Exception as error:  # noqa: BLE001  (a check that breaks is reported, not fatal)
            row(f"env/fast_path/{name}", "no", detail=f"the check failed ({one_line(error)})")

    def triton_kernels():
        from fastdino_kernels import use_triton
        from fastdino_kernels.dino_loss import _dino_loss_fwd_kernel

        return None if use_triton(_dino_loss_fwd_kernel, device) else f"Triton kernels do not run on {device}"

    def nvjpeg():
        from fastdino.data.gpu_decode import nvimgcodec_status

        usable, reason = nvimgcodec_status(device)
        return None if usable else reason

    def xformers():
        from fastdino.models.attention import xformers_unavailable_reason

        return xformers_unavailable_reason(str(device))

    def importable(module):
        def check():
            try:
                importlib.import_module(module)
            except Exception as error:  # noqa: BLE001  (ImportError, or a compiled part that fails to load)
                return one_line(error)
            return None
        return check

    fast_path("triton_kernels", triton_kernels)
    fast_path("xformers_attention", xformers)
    fast_path("nvjpeg_decode", nvjpeg)
    fast_path("ffcv", importable("ffcv"))
    fast_path("deepspeed", importable("deepspeed"))
    info["ffcv"] = next(r["detail"] for r in info["rows"] if r["what"] == "env/fast_path/ffcv")
    if info["cuda"]:
        measure_ceilings(torch, row)
    out.write_text(json.dumps(info))


def measure_ceilings(torch, row) -> None:
    """Device-to-device copy bandwidth (1 GiB of fp32, bytes read + written) and the bf16 matmul
    rate (8192^3 on random data), medians of triton.testing.do_bench."""
    from triton.testing import do_bench

    def copy_gbps(n=2**28):
        src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
        dst = torch.empty_like(src)
        return 2 * n * 4 / do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median") / 1e6

    def matmul_tflops(size=8192):
        a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return 2 * size**3 / do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median") / 1e9

    row("ceiling/copy_bandwidth", copy_gbps(), "GB/s", detail="1 GiB fp32 dst.copy_(src), read + write")
    row("ceiling/bf16_matmul", matmul_tflops(), "TFLOP/s", detail="8192^3 bf16 torch.matmul, random data")


# ---------------------------------------------------------------- running steps

class Suite:
    """Runs the sections in order inside the budget, collecting rows and statuses."""

    def __init__(self, args):
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.out / "rows.jsonl"
        self.rows_path.write_text("")
        # An earlier run's summary would otherwise stand next to this run's rows until this one ends.
        (self.out / "summary.txt").unlink(missing_ok=True)
        self.log = open(self.out / "suite.log", "w", buffering=1)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
        self.rows: list[dict] = []
        self.statuses: list[dict] = []
        self.cuda: bool | None = None  # None: not checked (the env section did not get that far)
        self.stopped: int | None = None  # the signal that interrupted the run
        self.closing = False  # writing the summary: a signal no longer interrupts
        self.ffcv_reason = "not checked"
        self.common = {"device": "unknown", "torch": None, "triton": None, "cuda": None, "python": None,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": shlex.join([sys.executable, *sys.argv])}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env.pop("TRITON_INTERPRET", None)

    # -- output

    def say(self, text: str) -> None:
        """A line on stdout and in the log."""
        print(text, flush=True)
        self.log.write(text + "\n")

    def add_rows(self, rows: list[dict], section: str) -> None:
        """Appends rows (each given the section and, where missing, the common fields) to rows.jsonl now."""
        with self.rows_path.open("a") as f:
            for row in rows:
                full = {**row, "section": section}
                for key, value in self.common.items():  # a script's own device, versions and command stay
                    full.setdefault(key, value)
                self.rows.append(full)
                f.write(json.dumps(full) + "\n")

    def record(self, section: str, what: str, value, unit: str = "", **extra) -> None:
        self.add_rows([make_row(what, value, unit, section, self.common, **extra)], section)

    # -- set-up

    def install_wheels(self) -> None:
        """Installs the --wheels this Python lacks into --site, and sets the children's PYTHONPATH."""
        site, wheels_dir = Path(self.args.site), Path(self.args.wheels)
        wheels = [str(p) for p in sorted(wheels_dir.glob("*.whl"))] if wheels_dir.is_dir() else []
        if self.args.no_install:
            self.say(f"--no-install: the wheels of {wheels_dir} and {site} are not used")
        elif not wheels:
            self.say(f"no wheels in {wheels_dir} (bench/gpu_wheels.sh makes them)")
        else:
            chosen, notes = wheels_to_install(wheels, installed_versions([str(site), *sys.path]), wheel_supported())
            for note in notes:
                self.log.write(f"wheel left out: {note}\n")
            if chosen:
                self.say(f"installing {len(chosen)} wheels of {wheels_dir} into {site}: "
                         + ", ".join(" ".join(wheel_name_version(w)) for w in chosen))
                try:
                    done = subprocess.run(pip_install_command(sys.executable, chosen, str(site)), capture_output=True,
                                          text=True, timeout=max(30.0, self.deadline - time.monotonic() - 60))
                    self.log.write(done.stdout + done.stderr)
                    if done.returncode != 0:
                        self.say(f"pip install failed (exit {done.returncode}): {(done.stderr or done.stdout)[-500:]}")
                except subprocess.TimeoutExpired:
                    self.say("pip install of the wheels timed out; the sections run with what is here")
            else:
                self.say(f"wheels: nothing to install ({len(notes)} wheels, all here already or not for here)")
        shim = self.tmp / "shim"
        shim.mkdir(exist_ok=True)
        (shim / "fastdino_kernels").symlink_to(REPO / "kernels", target_is_directory=True)
        paths = [str(site)] if site.is_dir() and not self.args.no_install else []
        if paths:
            self.say(f"the sections import first from {site} (wheels installed there; --no-install leaves it out)")
        paths += [str(REPO), str(shim)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env["PYTHONPATH"] = os.pathsep.join(paths)
        self.log.write(f"PYTHONPATH={self.env['PYTHONPATH']}\n")

    # -- steps

    def run_step(self, label: str, command: list[str], timeout: float) -> tuple[str, str]:
        """Runs one process with its output streamed to the log; (status, full output). Status is
        'ok', 'failed (exit N)' or 'timed out after N s' (its process group is then killed, as
        on Interrupted, which passes on)."""
        timeout = max(1.0, min(timeout, self.deadline - time.monotonic() - SUMMARY_RESERVE_S))
        self.log.write(f"\n===== {label}: $ {shlex.join(command)}   (limit {timeout:.0f} s)\n")
        output: list[str] = []

        def pump():
            for raw in proc.stdout:
                line = raw.decode(errors="replace")
                output.append(line)
                self.log.write(line)

        reader = threading.Thread(target=pump, daemon=True)
        proc = subprocess.Popen(command, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a timeout kills its children too
        try:
            reader.start()
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except (subprocess.TimeoutExpired, Interrupted) as stop:
            # Interrupted too: in a session of its own, the step never gets the terminal's Ctrl-C.
            signal_group(proc.pid, signal.SIGTERM)  # a chance to clean up (torch's and pytest's handlers)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            if isinstance(stop, Interrupted):
                raise
            status = f"timed out after {timeout:.0f} s"
        finally:
            signal_group(proc.pid, signal.SIGKILL)  # whatever is left of it, its children included
            proc.wait()
            if reader.ident is not None:
                reader.join(timeout=KILL_GRACE_S)
        text = "".join(output)
        if status != "ok":
            tail = "".join(output[-12:]).rstrip()
            self.say(f"  {label}: {status}; last lines:\n" + "\n".join("    " + t for t in tail.splitlines()))
        return status, text

    def run_json_step(self, section: str, label: str, command: list[str], timeout: float) -> str:
        """A benchmark script run with --json into a temporary file, whose rows join rows.jsonl."""
        path = self.tmp / f"{label.replace('/', '_').replace(' ', '_')}.jsonl"
        status, _ = self.run_step(label, [*command, "--json", str(path)], timeout)
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut off by a kill
                self.log.write(f"{label}: not a JSON row: {line[:200]}\n")
        self.add_rows(rows, section)
        if status != "ok" or not rows:
            self.record(section, f"{section}/step/{label}", status if status != "ok" else "no rows", "status",
                        detail="rows of a step that does not finish are lost" if status != "ok" else "")
        return status

    def run_steps(self, section: str, budget: float, steps=None) -> str:
        """Benchmark steps (default: the section's), in order, sharing `budget` as `allot` says; their statuses."""
        steps = section_steps(section, self.ffcv_reason == "runs here") if steps is None else steps
        end = time.monotonic() + budget
        statuses = []
        for i, (label, script, arguments, nominal) in enumerate(steps):
            later = sum(step[3] for step in steps[i + 1:])
            statuses.append(self.run_json_step(section, label, [sys.executable, str(script), *arguments],
                                               allot(end - time.monotonic(), nominal, later)))
        return ", ".join(statuses)

    # -- sections

    def section_env(self, budget: float) -> str:
        path = self.tmp / "env.json"
        status, _ = self.run_step("env", [sys.executable, str(Path(__file__).resolve()), CHILD_ENV, str(path)],
                                  budget)
        info = json.loads(path.read_text()) if path.is_file() else {}
        if info.get("cuda") is None:  # learn at least whether CUDA is here
            try:
                probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                                       capture_output=True, text=True, env=self.env, timeout=60)
                answer = probe.stdout.strip().splitlines()[-1:] if probe.returncode == 0 else []
                info["cuda"] = {"True": True, "False": False}.get(answer[0]) if answer else None
            except subprocess.TimeoutExpired:
                pass
        self.cuda = info.get("cuda")
        self.ffcv_reason = info.get("ffcv", "not checked")
        versions = info.get("versions", {})
        self.common.update(device=info.get("device", "unknown"), torch=versions.get("torch"),
                           triton=versions.get("triton"), cuda=versions.get("cuda"), python=versions.get("python"))
        self.add_rows(info.get("rows", []), "env")
        for row in info.get("rows", []):
            if row["what"].startswith(("env/device", "env/fast_path/", "ceiling/")):
                value = f"{row['value']:.1f} {row['unit']}" if isinstance(row["value"], float) else row["value"]
                self.say(f"  {row['what']}: {value}" + (f" ({row['detail']})" if row.get("detail") else ""))
        return status

    def section_cuda_tests(self, budget: float) -> str:
        status, output = self.run_step("cuda_tests", [sys.executable, *cuda_test_args()], budget)
        result = parse_pytest(output)
        self.record("cuda_tests", "cuda_tests/passed", result["passed"], "tests")
        self.record("cuda_tests", "cuda_tests/failed", result["failed"] + result["errors"], "tests",
                    detail=result["failed_ids"])
        self.record("cuda_tests", "cuda_tests/skipped", result["skipped"], "tests", detail=result["skip_reasons"])
        counts = f"{result['passed']} passed, {result['failed'] + result['errors']} failed, {result['skipped']} skipped"
        return counts if status == "ok" else f"{status}; {counts}"  # pytest exits 1 when a test fails

    def section_kernels(self, budget: float) -> str:
        end = time.monotonic() + budget
        first, *rest = section_steps("kernels", False)
        status = self.run_steps("kernels", allot(budget, first[3], sum(step[3] for step in rest)), [first])
        if status.startswith("failed"):
            # The likeliest cause is the torch.compile baseline: without it the fused kernels still
            # meet the eager loss and the floor.
            rest = [(label + "_no_compile", script, [*arguments, "--skip-compile"], nominal)
                    for label, script, arguments, nominal in [first, *rest]]
        return ", ".join([status, self.run_steps("kernels", end - time.monotonic(), rest)])

    def section_train_step(self, budget: float) -> str:
        return self.run_steps("train_step", budget)

    def section_loader(self, budget: float) -> str:
        if self.ffcv_reason != "runs here":
            self.record("loader", "loader/ffcv_gpu", "skipped", "status",
                        detail=f"FFCV does not import here ({self.ffcv_reason}): the loader is measured from JPEG "
                               "bytes in memory without FFCV's reader (rows labelled 'no FFCV')")
        return self.run_steps("loader", budget)

    def section_kernel_report(self, budget: float) -> str:
        if not (BENCH / "kernel_report.py").is_file():
            return "skipped: bench/kernel_report.py is not in this tree"
        return self.run_steps("kernel_report", budget)

    def on_signal(self, signum: int, frame) -> None:
        """SIGINT / SIGTERM: interrupts the run once; run_step stops the step being run."""
        if self.stopped is None:
            self.stopped = signum
            if not self.closing:
                raise Interrupted(signum)

    def add_status(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.statuses.append({"section": name, "status": status, "seconds": seconds, "detail": detail})
        self.record(name, f"section/{name}", status, "status", seconds=round(seconds, 1))
        if status.startswith(("skipped", "interrupted")):
            self.say(f"--- {name}: {status}")

    def run_section(self, name: str, nominal: float, later: float) -> None:
        remaining = self.deadline - time.monotonic() - SUMMARY_RESERVE_S
        budget = allot(remaining, nominal, later)
        if name == "env":
            budget = min(remaining, max(budget, nominal))
        started = time.monotonic()
        detail = ""
        if name not in NO_GPU_NEEDED and self.cuda is not True:
            env = next((s["status"] for s in self.statuses if s["section"] == "env"), "not run")
            status = ("skipped: no CUDA device (torch.cuda.is_available() is False)" if self.cuda is False
                      else f"skipped: CUDA not checked (env section: {env})")
        elif budget < 5:
            status = "skipped: no time left in the budget"
        else:
            self.say(f"\n--- {name} (up to {budget:.0f} s)")
            try:
                status = getattr(self, f"section_{name}")(budget)
            except Interrupted as stop:
                status = f"interrupted by {stop.name} after {time.monotonic() - started:.0f} s"
            except Exception as error:  # noqa: BLE001  (a fault of the suite itself: keep the other sections)
                self.log.write(traceback.format_exc())
                status = f"suite error: {type(error).__name__}: {error}"
            if name == "env":
                cuda = {True: "available", False: "not available", None: "not checked"}[self.cuda]
                detail = f"CUDA {cuda}; device {self.common['device']}"
        self.add_status(name, status, time.monotonic() - started, detail)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self.on_signal) for sig in STOP_SIGNALS}
        chosen = [(name, nominal) for name, nominal in SECTIONS if not self.args.only or name in self.args.only]
        current = "set-up"
        try:
            self.say(f"fastdino GPU suite: {self.common['command']}; budget {self.args.budget:.0f} s; "
                     f"out {self.out}")
            self.install_wheels()
            for i, (name, nominal) in enumerate(chosen):
                current = name
                self.run_section(name, nominal, sum(n for _, n in chosen[i + 1:]))
                if self.stopped is not None:
                    break
        except Interrupted:
            pass  # outside a section (the wheels' installation, between sections): nothing of it to keep
        self.closing = True
        ran = {status["section"] for status in self.statuses}
        for name, _ in chosen:
            if name not in ran:
                self.add_status(name, "not run: the suite was interrupted", 0.0)
        lines = summary_lines(self.rows, self.statuses, time.monotonic() - self.start)
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        self.log.write("\n".join(lines) + "\n")
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        print("\n".join(lines), flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if self.stopped is None:
            return 0
        print(f"gpu_suite.py: interrupted by {signal.Signals(self.stopped).name} during {current}: its processes "
              f"were stopped; what ran is in {self.out / 'summary.txt'}", file=sys.stderr, flush=True)
        return 128 + self.stopped  # the shell's status for a process ended by that signal


class Interrupted(BaseException):
    """SIGINT or SIGTERM reached the suite. Not an Exception, so that a section's own error
    handling cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.name = signal.Signals(signum).name


def signal_group(pgid: int, sig: int) -> None:
    """Sends `sig` to the process group `pgid` (one a step started), if any of it is left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def installed_versions(paths: list[str]) -> dict[str, str]:
    """{normalized distribution name: version} of what is installed on `paths` (first one wins)."""
    import importlib.metadata

    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=paths):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def wheel_supported():
    """A function saying whether a wheel file suits this interpreter (packaging's tags), or None
    where packaging is missing (then pip decides, and one unsuitable wheel fails the install)."""
    try:
        from packaging.tags import sys_tags
        from packaging.utils import parse_wheel_filename
    except ImportError:
        return None
    here = set(sys_tags())
    return lambda wheel: bool(set(parse_wheel_filename(Path(wheel).name)[3]) & here)


def budget_seconds(text: str) -> float:
    """--budget: a finite number of seconds, enough for the env section."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < MIN_BUDGET_S:
        raise argparse.ArgumentTypeError(f"{text}: give a finite number of seconds, at least {MIN_BUDGET_S:.0f} "
                                         "(the env section alone needs that much; every other section depends on it)")
    return seconds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="folder for rows.jsonl, suite.log and summary.txt "
                                                               "(made if missing; those three files are replaced)")
    p.add_argument("--budget", type=budget_seconds, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole suite (default {DEFAULT_BUDGET_S:.0f}, at least {MIN_BUDGET_S:.0f})")
    p.add_argument("--only", nargs="+", choices=[name for name, _ in SECTIONS],
                   help="run these sections only (env always runs: it tells the others whether CUDA is here)")
    p.add_argument("--wheels", default=str(REPO / ".whl"),
                   help="folder of wheels to install where this Python lacks them (default .whl/, made by "
                        "bench/gpu_wheels.sh)")
    p.add_argument("--site", default="/tmp/site", help="where those wheels are installed (default /tmp/site)")
    p.add_argument("--no-install", action="store_true",
                   help="install no wheels, and leave the --site folder off the sections' path")
    args = p.parse_args(argv)
    if args.only and "env" not in args.only:
        args.only = ["env", *args.only]  # the other sections need to know whether CUDA is here
    return args


def out_folder_problem(out: Path) -> str | None:
    """Why `out` cannot be the output folder (made here where missing), or None."""
    if out.exists() and not out.is_dir():
        return "it is a file, not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot make the folder ({error.strerror or error})"
    return None if os.access(out, os.W_OK | os.X_OK) else "the folder is not writable"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [CHILD_ENV]:
        child_env(Path(argv[1]))
        return 0
    args = parse_args(argv)
    problem = out_folder_problem(Path(args.out))
    if problem:
        sys.exit(f"gpu_suite.py: --out {args.out}: {problem}")
    return Suite(args).run()


if __name__ == "__main__":
    sys.exit(main())
