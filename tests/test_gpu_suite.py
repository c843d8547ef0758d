"""bench/gpu_suite.py and bench/gpu_wheels.sh, on a machine without a GPU.

The suite's GPU sections can only run on the GPU machine; here: its pure logic (the budget,
which carried wheels to install, rows, pytest's outcomes, the summary), its arguments, that
every step's command line is one its script accepts, that a step that hangs is killed and one
that finishes has its rows kept, that Ctrl-C or SIGTERM stops the running step and still
writes the summary, that each run's files describe that run only, that the wheel list covers
every package the suite's code imports which the GPU machine lacks, and the whole suite on
this CPU (env and kernel_report run, GPU sections skipped, exit 0, quickly).
"""
import ast
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def load(name):
    """A bench/ script as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = load("gpu_suite")

# The Python packages of the GPU machine the suite was written for (H200, image 'cuda', read 2026-11-17).
H200_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
# Installed here under another name than there.
SAME_THING_THERE = {"opencv-python": "opencv-python-headless"}
# Declared requirements that are never imported outside ffcv.benchmarks, which the suite does not run.
UNUSED_REQUIREMENTS = {"ffcv": {"terminaltables", "pytorch-pfn-extras", "fastargs", "assertpy"}}


def carried_packages():
    listed = subprocess.run(["bash", str(BENCH / "gpu_wheels.sh"), "--list"], capture_output=True, text=True,
                            check=True).stdout.split("\n")
    return {suite.normalize(line.split("==")[0]): line.split("==")[1].split()[0] for line in listed if line.strip()}


def test_allot_gives_slack_to_the_next_step_and_shares_a_shortfall():
    assert suite.allot(500, 100, 300) == 200  # 100 s ahead: the current step may use them
    assert suite.allot(400, 100, 300) == 100
    assert suite.allot(200, 100, 300) == pytest.approx(50)  # half the time left: half of every share
    assert suite.allot(0, 100, 300) == 0 and suite.allot(-5, 10, 0) == 0
    assert suite.allot(30, 40, 0) == 30
    total, spent = suite.DEFAULT_BUDGET_S, sum(n for _, n in suite.SECTIONS)
    assert spent <= total - 15  # room for the wheels' installation and the summary


def test_wheels_to_install():
    wheels = ["/w/omegaconf-2.4.0-py3-none-any.whl", "/w/typing_extensions-4.16.0-py3-none-any.whl",
              "/w/pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl", "/w/Deep_Speed-0.19.8-py3-none-any.whl",
              "/w/xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl"]
    installed = {"typing-extensions": "4.15.0", "omegaconf": "2.4.0", "xformers": "0.0.36"}
    chosen, notes = suite.wheels_to_install(wheels, installed, supported=lambda wheel: "cp312" not in wheel)
    assert [Path(w).name for w in chosen] == ["Deep_Speed-0.19.8-py3-none-any.whl",
                                              "typing_extensions-4.16.0-py3-none-any.whl"]
    assert sorted(notes) == ["omegaconf-2.4.0-py3-none-any.whl: omegaconf 2.4.0 is here",
                             "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl: "
                             "not for this Python or platform",
                             "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl: xformers 0.0.36 is here"]
    assert suite.wheel_name_version("nvidia_nvimgcodec_cu13-0.9.0.20-py3-none-x.whl") == ("nvidia-nvimgcodec-cu13",
                                                                                       "0.9.0.20")
    assert suite.version_key("2.11.0+cu130") == (2, 11, 0) and suite.version_key("1.2.10") > suite.version_key("1.2.9")
    command = suite.pip_install_command("python3", chosen, "/tmp/site")
    assert command[:3] == ["python3", "-m", "pip"] and "--no-index" in command and "--no-deps" in command
    assert command[command.index("--target") + 1] == "/tmp/site" and command[-2:] == chosen


def test_rows_carry_device_versions_date_and_command():
    common = {"device": "NVIDIA H200 (140 GiB, 132 SMs, sm_90)", "torch": "2.11.0", "triton": "3.6.0",
              "cuda": "13.0", "python": "3.12.3", "date": "2026-11-30T12:00:00+00:00",
              "command": "python3 bench/gpu_suite.py --out /out"}
    row = suite.make_row("ceiling/copy_bandwidth", 4300.0, "GB/s", "env", common, detail="1 GiB")
    assert list(row)[:4] == ["what", "value", "unit", "section"]
    assert row["detail"] == "1 GiB" and all(row[key] == value for key, value in common.items())
    json.dumps(row)


PYTEST_OUTPUT = """\
tests/test_kernels_ema.py::test_fp32_bit_exact_with_torch_lerp[cpu-0.996] SKIPPED (kernels compiled) [  2%]
tests/test_kernels_ema.py::test_fp32_bit_exact_with_torch_lerp[cuda-0.996] PASSED [  4%]
tests/test_kernels_ema.py::test_centre_in_the_same_launch[cuda] FAILED   [  6%]
tests/test_gpu_decode.py::test_gpu_loader_matches_cpu_loader[nvjpeg] ERROR [  8%]
tests/test_models.py::test_xformers_on_cuda_matches_math PASSED           [ 10%]
ERROR tests/test_gpu_config.py - ModuleNotFoundError: No module named 'x'
SKIPPED [1] tests/test_kernels_ema.py:40: kernels compiled
SKIPPED [3] tests/test_gpu_decode.py:165: needs a CUDA GPU
FAILED tests/test_kernels_ema.py::test_centre_in_the_same_launch[cuda] - AssertionError
==== 2 passed, 1 failed, 1 skipped, 2 errors in 12.0s ====
"""


def test_parse_pytest():
    result = suite.parse_pytest(PYTEST_OUTPUT)
    assert (result["passed"], result["failed"], result["skipped"], result["errors"]) == (2, 1, 1, 2)
    assert result["failed_ids"] == ["tests/test_kernels_ema.py::test_centre_in_the_same_launch[cuda]",
                                    "tests/test_gpu_decode.py::test_gpu_loader_matches_cpu_loader[nvjpeg]",
                                    "tests/test_gpu_config.py (collection)"]
    assert result["skip_reasons"] == {"kernels compiled": 1, "needs a CUDA GPU": 3}


def test_summary_from_rows():
    tag = "vit_small16_d12_B128_2x224+10x96_K65536"
    rows = [{"what": "env/device", "value": "NVIDIA H200"}, {"what": "env/version/torch", "value": "2.11.0"},
            {"what": "env/fast_path/xformers_attention", "value": "no", "detail": "no operator"},
            {"what": "ceiling/copy_bandwidth", "value": 4310.0}, {"what": "ceiling/bf16_matmul", "value": 780.5},
            {"what": "dino_loss/fwd+bwd/triton/B64/crops12/K65536/bf16", "value": 95.0, "unit": "us"},
            {"what": "dino_loss/fwd+bwd/eager/B64/crops12/K65536/bf16", "value": 2500.0, "unit": "us"},
            {"what": "dino_loss/fwd+bwd/floor/B64/crops12/K65536/bf16", "value": 78.0, "unit": "us"},
            {"what": "ema/triton/params44017792/fp32", "value": 130.0, "unit": "us"},
            {"what": "ema/foreach/params44017792/fp32", "value": 210.0, "unit": "us"},
            {"what": f"train_step/{tag}/fastdino/throughput", "value": 3100.0},
            {"what": f"train_step/{tag}/official/throughput", "value": 800.0},
            {"what": f"train_step/{tag}/fastdino/mfu", "value": 0.48},
            {"what": f"train_step/{tag}/speedup", "value": 3.875},
            {"what": "loader gpu-bytes (no FFCV), 2 x 224 + 10 x 96 crops, img_per_s", "value": 5000.0},
            {"what": "loader gpu-bytes (no FFCV), 2 x 224 + 10 x 96 crops, cores_used", "value": 3.5}]
    for row in rows:
        row["section"] = "x"
    statuses = [{"section": "kernels", "status": "ok, ok", "seconds": 80.0},
                {"section": "loader", "status": "skipped: no CUDA device", "seconds": 0.0}]
    text = "\n".join(suite.summary_lines(rows, statuses, 300.0))
    assert "device: NVIDIA H200" in text and "versions: torch 2.11.0" in text
    assert "fast path xformers_attention: no (no operator)" in text
    assert "copy 4310 GB/s" in text and "bf16 matmul 780 TFLOP/s" in text  # rounded to whole numbers
    assert "B64/crops12/K65536/bf16" in text and "2500" in text and "78" in text
    assert "EMA params44017792: triton 130 us, foreach 210 us, floor - us" in text
    line = next(line for line in text.splitlines() if line.startswith(tag))
    assert line.split()[1:] == ["3100.0", "800.0", "3.88x", "48.0%", "-"]
    assert "gpu-bytes (no FFCV), 2 x 224 + 10 x 96 crops: 5000.0 img/s on 3.50 CPU cores" in text
    assert "loader" in text and "skipped: no CUDA device" in text


def test_every_step_is_a_command_its_script_accepts():
    from fastdino.config import load_config

    for section in ("kernels", "train_step", "loader", "kernel_report"):
        for label, script, arguments, nominal in suite.section_steps(section, ffcv_imports=True):
            assert script.is_file() and nominal > 0, label
            args = load(script.stem).parse_args([*arguments, "--json", "/tmp/rows.jsonl"])
            assert args.json == "/tmp/rows.jsonl"
            if script.stem == "bench_train":
                cfg = load_config(None, [*args.overrides, "data.path=synthetic"])  # as bench_train.py does
                assert (cfg.data.n_local_crops, cfg.model.out_dim) == (10, 65536)
    assert [label for label, *_ in suite.section_steps("loader", ffcv_imports=False)] == ["loader_gpu_bytes"]
    assert sum(step[3] for step in suite.section_steps("train_step", True)) <= dict(suite.SECTIONS)["train_step"]
    for test in suite.CUDA_TESTS:
        assert (ROOT / test.split("::")[0]).is_file(), test


@pytest.fixture
def cpu_suite(tmp_path):
    """A Suite on this machine, writing to tmp_path/out."""
    args = suite.parse_args(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "no-wheels"),
                             "--site", str(tmp_path / "site"), "--budget", "60"])
    made = suite.Suite(args)
    yield made
    made.log.close()
    shutil.rmtree(made.tmp, ignore_errors=True)


def test_a_step_that_hangs_is_killed_at_its_limit(cpu_suite):
    start = time.monotonic()
    status, output = cpu_suite.run_step("hang", [sys.executable, "-c", "import time; print('started', flush=True); "
                                                 "time.sleep(60)"], timeout=2)
    assert status == "timed out after 2 s" and "started" in output and time.monotonic() - start < 15


def test_rows_of_a_step_join_rows_jsonl_with_the_section(cpu_suite):
    writer = ("import json, sys; f = open(sys.argv[sys.argv.index('--json') + 1], 'a'); "
              "f.write(json.dumps({'what': 'x/y', 'value': 1.5, 'unit': 'us', 'device': 'own'}) + '\\n')")
    assert cpu_suite.run_json_step("kernels", "writer", [sys.executable, "-c", writer], timeout=60) == "ok"
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    assert cpu_suite.run_json_step("kernels", "failing", failing, timeout=60) == "failed (exit 3)"
    rows = [json.loads(line) for line in (cpu_suite.out / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["what"] == "x/y" and rows[0]["section"] == "kernels" and rows[0]["device"] == "own"
    assert rows[0]["command"] == cpu_suite.common["command"] and "date" in rows[0]
    assert rows[1]["what"] == "kernels/step/failing" and rows[1]["value"] == "failed (exit 3)"


def test_wheel_list_covers_what_the_gpu_machine_lacks():
    """Every package the suite's code imports (fastdino, its kernels, the bench scripts and the CUDA
    tests), and every requirement of a carried package, is on the GPU machine or carried."""
    carried = carried_packages()
    assert {"omegaconf", "xformers", "deepspeed", "nvidia-nvimgcodec-cu13", "nvidia-nvjpeg", "ffcv"} <= set(carried)
    providers = importlib.metadata.packages_distributions()
    files = [*(ROOT / "fastdino").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *BENCH.glob("*.py"),
             *(ROOT / test.split("::")[0] for test in suite.CUDA_TESTS), ROOT / "tests" / "conftest.py"]
    local = {path.stem for path in [*BENCH.glob("*.py"), *(ROOT / "tests").glob("*.py")]} | {"fastdino",
                                                                                               "fastdino_kernels"}
    missing = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local:
                    continue
                if name.startswith("nvidia.nvimgcodec") or top == "nvidia":
                    needed = {"nvidia-nvimgcodec-cu13", "nvidia-nvjpeg"}
                else:
                    needed = {suite.normalize(d) for d in providers.get(top, [top])}
                for dist in needed:
                    if SAME_THING_THERE.get(dist, dist) not in H200_PACKAGES and dist not in carried:
                        missing.add(f"{dist} (import {name} in {path.relative_to(ROOT)})")
    for dist in carried:
        try:
            requirements = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (the nvidia wheels): their wheels declare only each other
        for requirement in requirements:
            if "extra ==" in requirement:
                continue
            name = suite.normalize(requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0]
                                   .split("=")[0].split("!")[0].split("~")[0].strip())
            if name in UNUSED_REQUIREMENTS.get(dist, ()):
                continue
            if SAME_THING_THERE.get(name, name) not in H200_PACKAGES and name not in carried:
                missing.add(f"{name} (required by {dist})")
    assert not missing, sorted(missing)


def test_on_this_cpu_it_runs_the_env_section_and_skips_the_gpu_ones(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCH / "gpu_suite.py"), "--out", str(out), "--wheels",
                           str(tmp_path / "none"), "--site", str(tmp_path / "site")], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["rows.jsonl", "suite.log", "summary.txt"]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    for row in rows:
        assert {"what", "value", "unit", "section", "device", "torch", "triton", "date", "command"} <= set(row)
    by_what = {row["what"]: row for row in rows}
    assert by_what["section/env"]["value"] == "ok"
    import torch

    if torch.cuda.is_available():
        pytest.skip("the rest checks a machine without CUDA")
    assert by_what["env/cuda_available"]["value"] is False and "no CUDA" in by_what["env/device"]["value"]
    assert by_what["env/fast_path/nvjpeg_decode"]["detail"] == "the device is cpu, not a CUDA GPU"
    for name in ("cuda_tests", "kernels", "train_step", "loader"):
        assert by_what[f"section/{name}"]["value"].startswith("skipped: no CUDA device"), name
    summary = (out / "summary.txt").read_text()
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
    assert "fastdino GPU suite: summary" in summary and "no CUDA" in summary
    if importlib.util.find_spec("triton.backends.nvidia") is not None:  # compiles for sm_90 without a GPU
        assert by_what["section/kernel_report"]["value"] == "ok"
        assert any(row["what"].startswith("kernel_report/") and row["section"] == "kernel_report" for row in rows)
        assert "Triton kernels as compiled here" in summary


def test_a_failed_kernels_step_is_rerun_without_torch_compile(tmp_path, monkeypatch):
    """The whole run on an assumed GPU, with the kernels section's script replaced by one that fails
    unless given --skip-compile and then writes a row."""
    script = tmp_path / "fake_bench_kernels.py"
    script.write_text("import json, sys\n"
                      "if '--skip-compile' not in sys.argv: sys.exit(1)\n"
                      "with open(sys.argv[sys.argv.index('--json') + 1], 'a') as f:\n"
                      "    f.write(json.dumps({'what': 'dino_loss/fwd+bwd/triton/B64/crops12/K65536/' + sys.argv[2],\n"
                      "                        'value': 90.0, 'unit': 'us'}) + '\\n')\n")
    steps = [("kernels_bf16", script, ["--dtypes", "bf16"], 65), ("kernels_fp32", script, ["--dtypes", "fp32"], 45)]
    monkeypatch.setattr(suite, "section_steps", lambda section, ffcv_imports: steps)

    def fake_env(self, budget):
        self.cuda = True
        return "ok"

    monkeypatch.setattr(suite.Suite, "section_env", fake_env)
    args = suite.parse_args(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none"), "--site",
                             str(tmp_path / "site"), "--only", "kernels"])
    assert suite.Suite(args).run() == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    whats = [row["what"] for row in rows]
    assert whats[:2] == ["section/env", "kernels/step/kernels_bf16"]
    assert [w.split("/")[-1] for w in whats if w.startswith("dino_loss/")] == ["bf16", "fp32"]
    status = next(row for row in rows if row["what"] == "section/kernels")["value"]
    assert status == "failed (exit 1), ok, ok"
    assert "B64/crops12/K65536/bf16" in (tmp_path / "out" / "summary.txt").read_text()


@pytest.mark.parametrize("budget", ["0", "-5", "1", "29", "nan", "inf", "ten"])
def test_a_budget_too_small_or_not_a_number_is_refused(budget, capsys):
    with pytest.raises(SystemExit) as exit_:
        suite.parse_args(["--out", "/tmp/unused", "--budget", budget])
    assert exit_.value.code == 2 and "--budget" in capsys.readouterr().err
    assert suite.parse_args(["--out", "/tmp/unused", "--budget", "30"]).budget == 30


def test_out_is_required_and_must_be_a_folder_that_can_be_made(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.parse_args([])
    assert "the following arguments are required: --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.parse_args(["--help"])
    usage = capsys.readouterr().out
    assert "--out DIR" in usage and "[--out" not in usage
    for internal in ("device tool", "carry=", "$OUT"):
        assert internal not in usage
    a_file = tmp_path / "file"
    a_file.write_text("")
    for out, problem in ((a_file, "it is a file, not a folder"), (a_file / "sub", "cannot make the folder"),
                         ("/proc/no/such/folder", "cannot make the folder")):
        with pytest.raises(SystemExit) as exit_:
            suite.main(["--out", str(out), "--budget", "60"])
        message = str(exit_.value.code)
        assert message.startswith(f"gpu_suite.py: --out {out}: {problem}") and "\n" not in message


def fake_env(cuda, status="ok", row=None):
    """A section_env that runs no process: sets what it learnt of CUDA (None: not checked)."""
    def section_env(self, budget):
        self.cuda = cuda
        if row:
            self.record("env", row, 1.0, "x")
        return status
    return section_env


def suite_args(tmp_path, *extra):
    return suite.parse_args(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "none"), "--site",
                             str(tmp_path / "site"), *extra])


def section_rows(out):
    return {row["what"]: row for row in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}


def test_cuda_that_was_never_checked_is_not_reported_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(suite.Suite, "section_env", fake_env(None, "failed (exit 1)"))
    assert suite.Suite(suite_args(tmp_path, "--only", "kernels", "loader")).run() == 0
    rows = section_rows(tmp_path / "out")
    for name in ("kernels", "loader"):
        assert rows[f"section/{name}"]["value"] == "skipped: CUDA not checked (env section: failed (exit 1))"
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "CUDA not checked; device unknown" in summary and "no CUDA device" not in summary


def test_kernel_report_runs_without_cuda(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(suite.Suite, "section_env", fake_env(False))
    monkeypatch.setattr(suite.Suite, "section_kernel_report", lambda self, budget: ran.append(budget) or "ok")
    assert suite.Suite(suite_args(tmp_path, "--only", "kernels", "kernel_report")).run() == 0
    rows = section_rows(tmp_path / "out")
    assert ran and rows["section/kernel_report"]["value"] == "ok"
    assert rows["section/kernels"]["value"].startswith("skipped: no CUDA device")


def test_each_run_starts_its_files_afresh(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(suite.Suite, "section_env", fake_env(False, row="x/first_run"))
    assert suite.Suite(suite_args(tmp_path, "--only", "kernels")).run() == 0
    assert "x/first_run" in section_rows(out) and (out / "summary.txt").is_file()
    (out / "other.txt").write_text("kept")
    monkeypatch.setattr(suite.Suite, "section_env", fake_env(False, row="x/second_run"))
    second = suite.Suite(suite_args(tmp_path, "--only", "kernels"))
    assert not (out / "summary.txt").exists()  # not the first run's, while the second one runs
    assert second.run() == 0
    rows = section_rows(out)
    assert "x/second_run" in rows and "x/first_run" not in rows
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)  # one section/... row per section
    assert (out / "other.txt").read_text() == "kept"


def test_no_install_leaves_the_site_folder_off_the_path(tmp_path, capsys):
    (tmp_path / "site").mkdir()
    for extra, on_path in (((), True), (("--no-install",), False)):
        made = suite.Suite(suite_args(tmp_path, *extra))
        try:
            made.install_wheels()
        finally:
            made.log.close()
            shutil.rmtree(made.tmp, ignore_errors=True)
        assert (str(tmp_path / "site") in made.env["PYTHONPATH"].split(os.pathsep)) == on_path, extra
    assert f"--no-install: the wheels of {tmp_path / 'none'} and {tmp_path / 'site'} are not used" in \
        capsys.readouterr().out


# The suite with its env section replaced by a step that writes its pid to argv[2] and sleeps.
SLEEPING_ENV = textwrap.dedent("""
    import sys

    sys.path.insert(0, sys.argv[1])
    import gpu_suite

    SLEEP = ("import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); "
             "os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(120)")

    def sleeping_env(self, budget):
        return self.run_step("env", [sys.executable, "-c", SLEEP, sys.argv[2]], budget)[0]

    gpu_suite.Suite.section_env = sleeping_env
    sys.exit(gpu_suite.main(sys.argv[3:]))
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_running_step_and_writes_the_summary(tmp_path, sig):
    out, pid_file = tmp_path / "out", tmp_path / "step.pid"
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_ENV, str(BENCH), str(pid_file), "--out", str(out),
                             "--wheels", str(tmp_path / "none"), "--site", str(tmp_path / "site"), "--only", "kernels"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert pid_file.is_file(), proc.communicate(timeout=30)
        step = int(pid_file.read_text())
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, stdout[-2000:] + stderr[-2000:]
    assert stderr.strip().splitlines() == [f"gpu_suite.py: interrupted by {name} during env: its processes were "
                                           f"stopped; what ran is in {out / 'summary.txt'}"]
    with pytest.raises(ProcessLookupError):
        os.kill(step, 0)  # stopped and reaped: its time limit no longer enforced by anyone
    rows = section_rows(out)
    assert rows["section/env"]["value"].startswith(f"interrupted by {name} after")
    assert rows["section/kernels"]["value"] == "not run: the suite was interrupted"
    summary = (out / "summary.txt").read_text()
    assert f"interrupted by {name}" in summary and "not run: the suite was interrupted" in summary


def test_env_gets_at_least_its_share_of_a_short_budget(tmp_path, monkeypatch):
    given = []

    def env(self, budget):
        given.append(budget)
        self.cuda = False
        return "ok"

    monkeypatch.setattr(suite.Suite, "section_env", env)
    monkeypatch.setattr(suite.Suite, "section_kernel_report", lambda self, budget: "ok")
    assert suite.Suite(suite_args(tmp_path, "--budget", "60")).run() == 0
    assert given[0] >= dict(suite.SECTIONS)["env"] - 1  # not 55 s x 40 / 490 of it: every section depends on env
