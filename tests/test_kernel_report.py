"""bench/kernel_report.py: the sm_90 occupancy arithmetic, the SASS loop count, and one
small report run end to end through `fastdino bench kernels --report` (compiles, no GPU)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import kernel_report  # noqa: E402
from bench_kernels import vit_small_dino_shapes  # noqa: E402


@pytest.mark.parametrize("regs, warps, shared, blocks, limiter", [
    (167, 4, 0, 3, "registers"),  # 168 x 32 = 5376 registers per warp: 3 warps per sub-partition
    (96, 4, 0, 5, "registers"),
    (57, 8, 0, 4, "registers"),  # rounded up to 64
    (56, 4, 512, 9, "registers"),
    (32, 8, 0, 8, "registers"),  # = the 64-warp limit; both give 8
    (16, 1, 0, 32, "blocks"),
    (32, 4, 100 * 1024, 2, "shared memory"),  # 100 KB + 1 KB reserved per block
])
def test_occupancy_known_cases(regs, warps, shared, blocks, limiter):
    assert kernel_report.occupancy(regs, warps, shared) == (blocks, limiter)


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                  /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;            /* 0x0000000000000000 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R6.64] ;        /* 0x0000000000000000 */
        /*0030*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;       /* 0x0000000000000000 */
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;           /* 0x0000000000000000 */
        /*0050*/               @P0 BRA 0x20 ;                              /* 0x0000000000000000 */
        /*0060*/              @!P1 BRA 0x10 ;                              /* 0x0000000000000000 */
        /*0070*/                   STG.E desc[UR4][R2.64], R3 ;            /* 0x0000000000000000 */
        /*0080*/                   EXIT ;                                  /* 0x0000000000000000 */
        /*0090*/                   BRA 0x90;                               /* 0x0000000000000000 */
        /*00a0*/                   NOP;                                    /* 0x0000000000000000 */
"""


def test_sass_stats_takes_the_innermost_loop():
    stats = kernel_report.sass_stats(SASS)
    assert stats["sass_instructions"] == 9  # the trailing self-branch and NOP are padding
    assert stats["tile_instructions"] == 4  # 0x20..0x50; 0x10..0x60 encloses it
    assert stats["tile_ops"]["LDG"] == 1 and stats["tile_ops"]["SHFL"] == 1 and stats["tile_ops"]["BAR"] == 1
    assert stats["tile_ops"]["STG"] == 0
    assert kernel_report.sass_stats(SASS.replace("@P0 BRA 0x20", "NOP").replace("@!P1 BRA 0x10", "NOP")) == dict(
        sass_instructions=9, tile_instructions=None, tile_ops=None)


def test_report_compiles_every_kernel_for_sm90(tmp_path):
    """With TRITON_INTERPRET=1 set, which the report must drop by re-running itself."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path / "report.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "fastdino", "bench", "kernels", "--report", "--batches", "64", "--crops", "12",
         "--dtypes", "bf16", "--json", str(out)],
        cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm_90 (compiled, not run), 132 SMs: triton" in proc.stdout
    rows = {row["kernel"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(kernel_report.KERNELS.values())
    for name, row in rows.items():
        assert {"what", "value", "unit", "device", "torch", "triton", "ptxas", "date", "command"} <= row.keys()
        assert row["device"] == "sm_90 (compiled, not run)" and row["unit"] == "registers/thread"
        assert row["command"].endswith("--report --batches 64 --crops 12 --dtypes bf16 --json " + str(out))
        assert 0 < row["value"] == row["n_regs"] <= 255 and row["spill_store_bytes"] >= 0
        assert row["blocks_per_sm"] >= 1 and row["waves"] > 0 and row["programs"] == math.prod(row["grid"])
        assert row["sass_instructions"] > 0
        if name != "_dino_loss_fwd_finalize_kernel":  # the only kernel without a loop over K tiles
            assert 0 < row["tile_instructions"] < row["sass_instructions"] and row["tile_ops"]["LDG"] > 0
    for name in ("_dino_loss_fwd_kernel", "_dino_loss_bwd_kernel"):
        short = kernel_report.SHORT_NAMES[name]
        assert rows[name]["what"] == f"kernel_report/dino_loss_{short}/B64/crops12/K65536/bf16"
        assert rows[name]["constexprs"]["V"] == 12 and rows[name]["num_warps"] == 4
    chunk = 16384  # fastdino_kernels.ema.CHUNK and .clip.CHUNK (not imported: this process leaves triton alone)
    params = sum(math.prod(s) for s in vit_small_dino_shapes(65536))
    for name, short in (("_ema_kernel", "ema"), ("_scale_kernel", "clip")):
        assert rows[name]["what"] == f"kernel_report/{short}/params{params}/fp32"
        assert rows[name]["programs"] == sum(math.ceil(math.prod(s) / chunk) for s in vit_small_dino_shapes(65536))
    assert rows["_scale_kernel"]["shared_bytes"] == 0 and rows["_scale_kernel"]["spill_store_bytes"] == 0


@pytest.mark.parametrize("args, option", [
    (["--batches", "0"], "--batches"), (["--batches", "-3"], "--batches"), (["--batches", "64", "x"], "--batches"),
    (["--sms", "0"], "--sms"), (["--crops", "0"], "--crops"), (["--out-dim", "0"], "--out-dim"),
    (["--teacher-views", "0"], "--teacher-views"),
])
def test_sizes_below_one_are_argument_errors(args, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        kernel_report.parse_args(args, prog="fastdino bench kernels --report")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"fastdino bench kernels --report: error: argument {option}:" in err


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        kernel_report.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("logits dtypes, from bf16, fp32 (default both)", "output dimension (default 65536)",
                    "(default 64 128)", "(default 10 12)", "teacher views (default 2)", "(default 132"):
        assert default in help_text


@pytest.mark.parametrize("args, message", [
    (["--json", "/proc/no/such/rows.jsonl"], "kernel_report: --json /proc/no/such/rows.jsonl: cannot make the folder"),
    (["--python", "/bin/true"], "kernel_report: no report from /bin/true (exit 0): is it a Python interpreter"),
])
def test_an_unusable_json_path_or_python_is_one_line_before_any_compile(args, message):
    with pytest.raises(SystemExit) as exit_:
        kernel_report.main([*args, "--kernels", "ema"])
    assert str(exit_.value.code).startswith(message) and "\n" not in str(exit_.value.code)
