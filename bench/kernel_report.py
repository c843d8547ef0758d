"""Resource report of fastdino's Triton kernels on an H100/H200 (sm_90, 132 SMs), without a GPU.

Compiles every kernel for sm_90 exactly as its host launcher would launch it at the training
shapes (K = 65536; B = 64 and 128; 10 and 12 crops; 2 teacher views; bf16 and fp32 logits;
the EMA over ViT-S/16 + DINO head, fp32 teacher and student; the clipping's multiply over its
fp32 gradients) and prints, per launch:
registers per thread, spills, shared memory, warps, resident blocks per SM and what limits
them, the grid and its waves on the SMs, and SASS instruction counts, in total and in one
iteration of the loop over K tiles (with its global, shared and local loads and stores,
warp shuffles, barriers and MUFU ops).

How the launches are found: the host launchers (`_dino_loss_forward`, `_dino_loss_backward`,
`ema_update_tensors_`, `scale_tensors_`) run on meta tensors with each kernel replaced by a
recorder, so the grids and arguments are the launchers' own, with
`dino_loss_config(..., num_sms=132)`. Each recorded launch is specialised by Triton's own
binder (integers equal to 1 become constants, multiples of 16 and pointers get 16-byte
divisibility, as for torch allocations) and compiled with `triton.compile` for
GPUTarget("cuda", 90, 32). Registers and spills come from the ptxas log of that compile, SASS
from the wheel's cuobjdump.

    python bench/kernel_report.py                           # table for the installed triton
    python bench/kernel_report.py --json kernel_report_triton3.9.jsonl   # + rows in bench/results/
    python bench/kernel_report.py --python ../venv-t36/bin/python --json kernel_report_triton3.6.jsonl
    python bench/kernel_report.py --kernels ema --batches 64 --crops 12 --dtypes bf16   # one launch
    fastdino bench kernels --report [same options]

--python re-runs the report under another interpreter (e.g. a side environment with your GPU
machine's Triton version), which needs only torch, triton and numpy: the repository's `kernels/`
folder is put on its path as `fastdino_kernels`. TRITON_INTERPRET must not be set for the
compile; where it is, the report re-runs itself without it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DEVICE = "sm_90 (compiled, not run)"

# sm_90 limits (CUDA occupancy calculator, cuda_occupancy.h): registers are allocated per
# warp in units of 256 out of 4 sub-partitions of 16384; 64 warps, 32 blocks and 228 KB of
# shared memory per SM, of which the system reserves 1 KB per block.
REGS_PER_SUBPARTITION = 16384
SUBPARTITIONS = 4
REG_ALLOC_UNIT = 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128

KERNELS = {"fwd": "_dino_loss_fwd_kernel", "finalize": "_dino_loss_fwd_finalize_kernel",
           "bwd": "_dino_loss_bwd_kernel", "ema": "_ema_kernel", "clip": "_scale_kernel"}
PER_PARAMETER = ("ema", "clip")  # kernels over the parameter list, not the logits: one launch each
SHORT_NAMES = {kernel: name for name, kernel in KERNELS.items()}
TILE_OPS = ("LDG", "STG", "LDS", "LDSM", "STS", "SHFL", "BAR", "LDL", "STL", "MUFU")
STUDENT_TEMP, TEACHER_TEMP, EMA_MOMENTUM = 0.1, 0.04, 0.996  # runtime fp32 arguments: no effect on the code


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def parse_args(argv=None, prog: str = "kernel_report.py") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", nargs="+", choices=tuple(KERNELS), default=tuple(KERNELS), metavar="KERNEL",
                   help=f"kernels to compile, from {', '.join(KERNELS)} (default: all)")
    p.add_argument("--batches", type=positive_int, nargs="+", default=(64, 128), metavar="B",
                   help="images per GPU (default 64 128)")
    p.add_argument("--crops", type=positive_int, nargs="+", default=(10, 12), metavar="V",
                   help="student crops per image (default 10 12)")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=("bf16", "fp32"), metavar="DTYPE",
                   help="logits dtypes, from bf16, fp32 (default both)")
    p.add_argument("--teacher-views", type=positive_int, default=2, metavar="N", help="teacher views (default 2)")
    p.add_argument("--out-dim", type=positive_int, default=65536, metavar="K",
                   help="the head's output dimension (default 65536)")
    p.add_argument("--sms", type=positive_int, default=132, metavar="N",
                   help="SMs of the target GPU (default 132: H100/H200 SXM)")
    p.add_argument("--json", metavar="OUT", help="append one JSON row per launch to OUT (a bare name: bench/results/)")
    p.add_argument("--python", metavar="PY", help="re-run this report under another Python interpreter")
    p.add_argument("--rerun-of", help=argparse.SUPPRESS)  # set by `rerun`: the command the user ran
    p.add_argument("--rerun-done", help=argparse.SUPPRESS)  # set by `rerun`: a file to touch once the report is out
    return p.parse_args(argv)


def occupancy(n_regs: int, num_warps: int, shared_bytes: int) -> tuple[int, str]:
    """(resident blocks per SM on sm_90, the limiting resource) for a kernel of `n_regs`
    registers per thread, `num_warps` warps and `shared_bytes` of dynamic shared memory.

    A warp lives in one of the 4 sub-partitions, so the register limit is 4 x (warps per
    sub-partition); for blocks of a multiple of 4 warps this equals 65536 registers / (regs
    rounded up to a multiple of 8 x 32 x warps)."""
    regs_per_warp = math.ceil(n_regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    smem_per_block = math.ceil(shared_bytes / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT + SMEM_RESERVED_PER_BLOCK
    limits = {
        "registers": SUBPARTITIONS * (REGS_PER_SUBPARTITION // regs_per_warp) // num_warps,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
        "shared memory": SMEM_PER_SM // smem_per_block,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")


def sass_stats(sass: str) -> dict:
    """Instruction counts of one kernel's `cuobjdump -sass` listing.

    A loop is a backward branch (BRA to an address at or before it, not to itself) and its
    body the instructions from the target to the branch. The tile loop is the innermost loop
    (no other loop inside it) with the most instructions: in these kernels the loop over K
    tiles (the forward's loop over images encloses it). Counts are static: the body's
    instructions on every path through it. Without a loop the tile fields are None. The
    padding after the last EXIT (a branch to itself and NOPs) is not counted.
    """
    instrs = [(int(addr, 16), _PREDICATE.sub("", text)) for addr, text in _INSTR.findall(sass)]
    while instrs and (instrs[-1][1] == "NOP" or instrs[-1][1] == f"BRA 0x{instrs[-1][0]:x}"):
        instrs.pop()
    loops = []
    for i, (addr, text) in enumerate(instrs):
        if text.split(".")[0].split()[0] == "BRA":
            target = int(text.rsplit("0x", 1)[1], 16)
            if target < addr:
                loops.append((next(j for j, (a, _) in enumerate(instrs) if a >= target), i))
    innermost = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    stats = {"sass_instructions": len(instrs), "tile_instructions": None, "tile_ops": None}
    if innermost:
        start, end = max(innermost, key=lambda loop: loop[1] - loop[0])
        body = [text.split()[0].split(".")[0] for _, text in instrs[start:end + 1]]
        stats.update(tile_instructions=len(body), tile_ops={op: body.count(op) for op in TILE_OPS})
    return stats


@dataclasses.dataclass
class Launch:
    """One kernel launch as a host launcher made it, and the problem it belongs to."""

    name: str  # key of KERNELS
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict
    problem: dict  # dtype, batch, crops, ... for the table and the JSON row


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: `kernel[grid](*args, **kwargs)` records
    the launch instead of running it."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.name, self.kernel, tuple(grid), args, kwargs, {}))
        return launch


@contextlib.contextmanager
def recorded_launches(module, names, **patches):
    """Within the block, the kernels `names` (keys of KERNELS) of `module` record their launches
    into the yielded list; `patches` replace other module attributes."""
    launches: list[Launch] = []
    with contextlib.ExitStack() as stack:
        for name in names:
            kernel = getattr(module, KERNELS[name])
            stack.enter_context(mock.patch.object(module, KERNELS[name], _Recorder(name, kernel, launches)))
        for attr, value in patches.items():
            stack.enter_context(mock.patch.object(module, attr, value))
        yield launches


def loss_launches(args, torch, batch: int, n_crops: int, dtype_name: str) -> list[Launch]:
    """The launches of one forward and one backward of `dino_loss` on an `args.sms`-SM GPU."""
    import fastdino_kernels.dino_loss as dl

    n_teacher, K = args.teacher_views, args.out_dim
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config = dl.dino_loss_config(batch, n_crops, n_teacher, K, torch.device("cpu"), num_sms=args.sms)
    student = torch.empty(n_crops * batch, K, dtype=dtype, device="meta")
    teacher = torch.empty(n_teacher * batch, K, dtype=dtype, device="meta")
    center = torch.empty(K, dtype=torch.float32, device="meta")
    with recorded_launches(dl, ["fwd", "finalize", "bwd"]) as launches:
        _, _, stats_s, stats_t = dl._dino_loss_forward(student, teacher, center, STUDENT_TEMP, TEACHER_TEMP,
                                                        n_teacher, config)
        dl._dino_loss_backward(torch.ones((), device="meta"), student, teacher, center, stats_s, stats_t,
                               STUDENT_TEMP, TEACHER_TEMP, n_teacher, config)
    problem = dict(dtype=dtype_name, batch=batch, crops=n_crops, teacher_views=n_teacher, K=K,
                   config=dataclasses.asdict(config))
    for launch in launches:
        launch.problem = problem
    return [launch for launch in launches if launch.name in args.kernels]


def ema_launches(args, torch) -> list[Launch]:
    """The launch of one `ema_update_tensors_` over ViT-S/16 + DINO head (fp32 teacher and student)."""
    import fastdino_kernels.ema as ema
    from bench_kernels import vit_small_dino_shapes

    shapes = vit_small_dino_shapes(args.out_dim)
    teachers = [torch.empty(s, device="meta") for s in shapes]
    students = [torch.empty(s, device="meta") for s in shapes]
    with recorded_launches(ema, ["ema"], use_triton=lambda kernel, device: True) as launches:
        ema.ema_update_tensors_(teachers, students, EMA_MOMENTUM)
    for launch in launches:
        launch.problem = dict(dtype="fp32", params=sum(t.numel() for t in teachers), K=args.out_dim)
    return launches


def clip_launches(args, torch) -> list[Launch]:
    """The launch of one `scale_tensors_` (the clipping's multiply) over the gradients of ViT-S/16 +
    DINO head (fp32, separate allocations: 16-byte aligned)."""
    import fastdino_kernels.clip as clip
    from bench_kernels import vit_small_dino_shapes

    grads = [torch.empty(s, device="meta") for s in vit_small_dino_shapes(args.out_dim)]
    scales = torch.empty(len(grads), device="meta")
    with recorded_launches(clip, ["clip"], use_triton=lambda kernel, device: True) as launches:
        clip.scale_tensors_(grads, scales)
    for launch in launches:
        launch.problem = dict(dtype="fp32", params=sum(g.numel() for g in grads), K=args.out_dim)
    return launches


class Compiler:
    """Compiles recorded launches for sm_90 as `JITFunction.run` would, once per distinct
    specialisation, and reads the resources of the result."""

    def __init__(self):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend

        self.triton = triton
        self.target = GPUTarget("cuda", 90, 32)
        self.backend = make_backend(self.target)
        ptxas = get_ptxas(self.target.arch)
        self.ptxas = f"{Path(ptxas.path).name} {ptxas.version}"
        self.cache: dict[str, dict] = {}

    def resources(self, launch: Launch) -> dict:
        """Registers, spills, shared memory, warps and SASS counts of `launch`'s compiled kernel."""
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound, specialization, extra = binder(*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, launch.kwargs, bound, specialization,
                                                                   extra)
        key = repr((KERNELS[launch.name], signature, constexprs, attrs, options))
        if key not in self.cache:
            self.cache[key] = self._compile(kernel, signature, constexprs, attrs, options)
        return self.cache[key]

    def _compile(self, kernel, signature, constexprs, attrs, options) -> dict:
        from triton import knobs
        from triton.compiler import ASTSource

        # Triton prints the ptxas log it asks for (-v) when told to; a cached kernel has none.
        log = io.StringIO()
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            compiled = self.triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                                           options=options.__dict__)
        ptxas_log = log.getvalue()
        regs = re.search(r"Used (\d+) registers", ptxas_log)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
        if regs is None or frame is None:
            raise RuntimeError(f"no register count in the ptxas log of {kernel.__name__}: {ptxas_log[-2000:]!r}")
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", cubin.name], check=True, capture_output=True,
                                  text=True).stdout
        return dict(n_regs=int(regs[1]), stack_bytes=int(frame[1]), spill_store_bytes=int(frame[2]),
                    spill_load_bytes=int(frame[3]), shared_bytes=compiled.metadata.shared,
                    num_warps=compiled.metadata.num_warps,
                    constexprs={kernel.arg_names[path[0]]: value for path, value in constexprs.items()},
                    **sass_stats(sass))


def report_row(launch: Launch, res: dict, sms: int) -> dict:
    """The JSON row of one launch: what/value/unit as in bench/results, then the resources."""
    blocks, limiter = occupancy(res["n_regs"], res["num_warps"], res["shared_bytes"])
    programs = math.prod(launch.grid)
    p = launch.problem
    if launch.name in PER_PARAMETER:
        what = f"kernel_report/{launch.name}/params{p['params']}/{p['dtype']}"
    else:
        what = f"kernel_report/dino_loss_{launch.name}/B{p['batch']}/crops{p['crops']}/K{p['K']}/{p['dtype']}"
    return dict(what=what, value=res["n_regs"], unit="registers/thread", kernel=KERNELS[launch.name], **p,
                grid=list(launch.grid), programs=programs, **res, blocks_per_sm=blocks, occupancy_limiter=limiter,
                sms=sms, waves=programs / (blocks * sms))


def print_table(rows: list[dict]) -> None:
    header = (f"{'kernel':<9} {'dtype':>5} {'B':>4} {'V':>3} {'grid':>10} {'warps':>5} {'regs':>4} {'spill':>7} "
              f"{'smem':>6} {'blk/SM':>6} {'limit':>9} {'waves':>5} {'instr':>6} {'tile':>5} {'LDG':>4} {'STG':>4} "
              f"{'LDS':>4} {'STS':>4} {'SHFL':>4} {'BAR':>4} {'MUFU':>4} {'LDL':>4} {'STL':>4}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        ops = r["tile_ops"]
        tile = [r["tile_instructions"]] + ([ops["LDG"], ops["STG"], ops["LDS"] + ops["LDSM"]] + [
            ops[op] for op in ("STS", "SHFL", "BAR", "MUFU", "LDL", "STL")] if ops else [None] * 9)
        tile_text = " ".join(f"{'-' if x is None else x:>{w}}" for x, w in zip(tile, (5,) + (4,) * 9))
        print(f"{SHORT_NAMES[r['kernel']]:<9} {r['dtype']:>5} {r.get('batch', '-'):>4} "
              f"{r.get('crops', '-'):>3} {'x'.join(map(str, r['grid'])):>10} {r['num_warps']:>5} {r['n_regs']:>4} "
              f"{r['spill_store_bytes']:>3}/{r['spill_load_bytes']:<3} {r['shared_bytes']:>6} {r['blocks_per_sm']:>6} "
              f"{r['occupancy_limiter'][:9]:>9} {r['waves']:>5.2f} {r['sass_instructions']:>6} {tile_text}")
    print("spill: bytes of spill stores/loads per thread; smem: dynamic shared bytes per block (+1 KB reserved); "
          "tile: SASS instructions in one iteration of the loop over K tiles (LDS counts LDSM too)")


def json_path(out: str) -> Path:
    """--json's file: a bare name goes to bench/results/; its folder is made here, before the compile,
    so that a path that cannot be written fails at once (SystemExit, one line)."""
    path = Path(out)
    if path.parent == Path("."):
        path = RESULTS / path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        sys.exit(f"kernel_report: --json {out}: cannot make the folder {path.parent} ({error.strerror or error})")
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        sys.exit(f"kernel_report: --json {out}: {path} is not a file that can be written")
    return path


def write_json(rows: list[dict], path: Path, common: dict) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({**row, **common}) + "\n")
    print(f"appended {len(rows)} rows to {path}")


def rerun(python: str, argv: list[str], command: str) -> int:
    """Runs this report with `argv` under `python` without TRITON_INTERPRET, with this
    repository's kernels importable as `fastdino_kernels`; returns its exit status, or exits
    with one line where `python` printed no report."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "fastdino_kernels").symlink_to(REPO / "kernels", target_is_directory=True)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([tmp] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        done = Path(tmp) / "done"
        code = subprocess.run([python, str(Path(__file__).resolve()), *argv, "--rerun-of", command,
                               "--rerun-done", str(done)], env=env).returncode
        # An exit status alone does not tell: something else than Python (`--python /bin/true`) exits 0 too.
        if not done.is_file():
            hint = ": is it a Python interpreter with torch and triton?" if code == 0 else ""
            sys.exit(f"kernel_report: no report from {python} (exit {code}){hint}")
        return code


def main(argv=None, prog: str = "kernel_report.py") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    command = args.rerun_of or shlex.join([Path(sys.executable).name] + sys.argv)
    if args.python and shutil.which(args.python) is None:
        sys.exit(f"kernel_report: no Python interpreter {args.python}")
    out = json_path(args.json) if args.json else None
    if args.rerun_of is None and (args.python or "TRITON_INTERPRET" in os.environ):
        # Triton fixes the interpreter mode when it is imported: compiling needs a process without it.
        return rerun(args.python or sys.executable, argv, command)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # bench_kernels, also when run from `fastdino bench kernels --report`
    try:
        import torch

        compiler = Compiler()
    except ImportError as error:
        sys.exit(f"kernel_report: needs torch and triton with its NVIDIA backend ({error})")
    launches = ema_launches(args, torch) if "ema" in args.kernels else []
    launches += clip_launches(args, torch) if "clip" in args.kernels else []
    if set(args.kernels) - set(PER_PARAMETER):
        for dtype_name in args.dtypes:
            for batch in args.batches:
                for n_crops in args.crops:
                    launches += loss_launches(args, torch, batch, n_crops, dtype_name)
    versions = dict(torch=torch.__version__, triton=compiler.triton.__version__, ptxas=compiler.ptxas)
    print(f"{DEVICE}, {args.sms} SMs: triton {versions['triton']}, {versions['ptxas']}, torch {versions['torch']}")
    rows = [report_row(launch, compiler.resources(launch), args.sms) for launch in launches]
    print_table(rows)
    if out:
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_json(rows, out, dict(device=DEVICE, **versions, date=date, command=command))
    if args.rerun_done:
        Path(args.rerun_done).touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
