"""Benchmark of the fused Triton kernels of fastdino against PyTorch, with a memory-bandwidth floor.

DINO loss, forward / backward / forward+backward, B = 32, 64, 128 images, 12 crops (2 global
+ 10 local), 2 teacher views, K = 65536, bf16 and fp32, for
    triton    fastdino_kernels.dino_loss.dino_loss
    eager     dino_loss_official_eager (the official DINOLoss arithmetic, pair by pair)
    compile   torch.compile(dino_loss_reference)
    floor     bytes that must move / copy bandwidth measured in the same run
EMA of a ViT-S/16 + DINO head parameter list (about 44M fp32 parameters):
    triton    fastdino_kernels.ema.ema_update_tensors_ (one launch)
    foreach   torch._foreach_lerp_
    floor     12 bytes per parameter / copy bandwidth

Backward is timed as (forward+backward) - forward. Timing on CUDA: triton.testing.do_bench
(median, L2 flushed between runs). See bench/kernels.md for the byte counts.

    python bench/bench_kernels.py                          # full table on the GPU
    python bench/bench_kernels.py --json h100.jsonl        # also append rows to bench/results/h100.jsonl
    ncu --nvtx --nvtx-include "loss_fwd_bwd/" -o loss python bench/bench_kernels.py --profile loss_fwd_bwd --iters 5
    python bench/bench_kernels.py --device cpu --tiny      # smoke run on the CPU, Triton interpreter
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PROFILE_TARGETS = ("loss_fwd", "loss_bwd", "loss_fwd_bwd", "ema", "copy")


def prog() -> str:
    """The command's name in usage and errors: `fastdino bench kernels` runs this file through fastdino.cli."""
    return "fastdino bench kernels" if "fastdino.cli" in sys.modules else Path(sys.argv[0]).name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog(), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu runs the Triton kernels under the interpreter (TRITON_INTERPRET=1): a smoke test")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (B=2, K=1000, a 1/100 parameter list)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="images per step (default 32 64 128)")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=("bf16", "fp32"))
    p.add_argument("--crops", type=int, default=12, help="student crops per image (default 12)")
    p.add_argument("--out-dim", type=int, default=65536, help="K, the head's output dimension")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile baseline")
    p.add_argument("--json", metavar="OUT", help="append one JSON row per measurement to bench/results/OUT")
    p.add_argument("--profile", choices=PROFILE_TARGETS,
                   help="run only this kernel --iters times, each inside an NVTX range named after it")
    p.add_argument("--impl", choices=("triton", "eager", "compile", "foreach"), default="triton",
                   help="implementation that --profile runs (eager/compile: loss; foreach: ema)")
    p.add_argument("--batch", type=int, default=64, help="images per step for --profile (2 with --tiny)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="logits dtype for --profile")
    p.add_argument("--iters", type=int, default=10, help="iterations for --profile")
    p.add_argument("--report", nargs=argparse.REMAINDER, metavar="...",
                   help="instead, compile the kernels for sm_90 and report their resources, no GPU needed: "
                        "bench/kernel_report.py, later arguments are its own (--report --help)")
    args = p.parse_args(argv)
    if args.report is not None:
        defaults = vars(p.parse_args([]))
        given = [f"--{key.replace('_', '-')}" for key, value in vars(args).items()
                 if key != "report" and value != defaults[key]]
        if given:
            # The report compiles for sm_90 and runs nothing: these options would silently not apply.
            p.error(f"{' '.join(given)} before --report: the report runs nothing and takes only its own options, "
                    "after --report (--report --help)")
    return args


def vit_small_dino_shapes(out_dim: int, patch: int = 16, image: int = 224) -> list[tuple[int, ...]]:
    """Parameter shapes of ViT-S/16 (official DINO layout) and its DINO head (3-layer MLP,
    hidden 2048, bottleneck 256, weight-normed last layer): 21.7M + 22.4M at K = 65536."""
    dim, hidden = 384, 4 * 384
    shapes = [(1, 1, dim), (1, (image // patch) ** 2 + 1, dim), (dim, 3, patch, patch), (dim,)]
    for _ in range(12):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (hidden, dim), (hidden,), (dim, hidden), (dim,)]
    shapes += [(dim,), (dim,)]
    shapes += [(2048, dim), (2048,), (2048, 2048), (2048,), (256, 2048), (256,), (out_dim, 1), (out_dim, 256)]
    return shapes


def out_dim(args) -> int:
    return 1000 if args.tiny else args.out_dim


def ema_shapes(args) -> list[tuple[int, ...]]:
    if args.tiny:
        return [tuple(max(1, d // 10) for d in s) for s in vit_small_dino_shapes(655)]
    return vit_small_dino_shapes(args.out_dim)


class Bench:
    """Timing, copy bandwidth, table and JSON rows for one run."""

    def __init__(self, args, torch, triton):
        self.args, self.torch, self.triton = args, torch, triton
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        from fastdino.runinfo import device_name

        self.device_name = device_name(self.device)
        self.rows: list[dict] = []
        self.copy_gbps = math.nan

    def time_us(self, fn, grad_to_none=None) -> float:
        if self.cuda:
            return self.triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none,
                                                return_mode="median") * 1e3
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    def peak_extra_mib(self, fn) -> float:
        """Peak memory fn allocates beyond what was allocated before it (CUDA only)."""
        if not self.cuda:
            return math.nan
        torch = self.torch
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def measure_copy_bandwidth(self) -> None:
        """Device-to-device copy: read + write bytes over the time of dst.copy_(src)."""
        n = (2**22 if self.args.tiny else 2**28)  # 16 MiB / 1 GiB of fp32
        src = self.torch.empty(n, dtype=self.torch.float32, device=self.device).uniform_()
        dst = self.torch.empty_like(src)
        us = self.time_us(lambda: dst.copy_(src))
        self.copy_gbps = 2 * src.numel() * 4 / us / 1e3
        print(f"copy bandwidth: {self.copy_gbps:.0f} GB/s ({2 * n * 4 / 2**30:.2f} GiB moved per copy, {us:.0f} us)")
        self.record("copy_bandwidth", self.copy_gbps, "GB/s")

    def record(self, what: str, value: float, unit: str) -> None:
        self.rows.append(dict(what=what, value=value, unit=unit))

    def write_json(self) -> None:
        path = Path(self.args.json)
        if path.parent == Path("."):
            path = RESULTS / path
        path.parent.mkdir(parents=True, exist_ok=True)
        from fastdino.runinfo import benchmark_context

        common = benchmark_context(self.device, [Path(sys.executable).name] + sys.argv)
        with path.open("a") as f:
            for row in self.rows:
                f.write(json.dumps({**row, **common}) + "\n")
        print(f"appended {len(self.rows)} rows to {path}")


def fmt(x: float, spec: str, suffix: str = "") -> str:
    """`x` formatted, or '-' where there is no value (no compile baseline, no CUDA memory stats)."""
    return "-" if math.isnan(x) else f"{x:{spec}}{suffix}"


def loss_problem(torch, batch, n_crops, K, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(n_crops * batch, K, generator=gen) * 2).to(device, dtype).requires_grad_()
    teacher = torch.randn(2 * batch, K, generator=gen).to(device, dtype)
    center = (torch.randn(K, generator=gen) * 0.3).to(device)
    return student, teacher, center


def loss_impls(args, torch, dl):
    impls = {"triton": dl.dino_loss, "eager": dl.dino_loss_official_eager}
    if not args.skip_compile:
        impls["compile"] = torch.compile(dl.dino_loss_reference)
    return impls


def loss_bytes(batch, n_crops, K, itemsize) -> dict[str, int]:
    """Bytes each pass must move at least: forward reads S, T and the centre and writes the K
    column sums, backward reads S, T and the centre again (no K-sized state is kept) and writes dS."""
    s, t = n_crops * batch * K * itemsize, 2 * batch * K * itemsize
    fwd, bwd = s + t + 8 * K, s + t + 4 * K + s
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def bench_loss(bench: Bench, dl) -> None:
    args, torch = bench.args, bench.torch
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    batches = args.batches or ([2] if args.tiny else [32, 64, 128])
    K = out_dim(args)
    impls = loss_impls(args, torch, dl)
    header = (f"{'dino_loss':<9} {'B':>4} {'dtype':>5} {'op':>7} {'impl':>8} {'time us':>9} {'GB/s':>7} "
              f"{'%copy':>6} {'vs eager':>8} {'vs comp':>8} {'peak MiB':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for dtype_name in args.dtypes:
        dtype = dtypes[dtype_name]
        for batch in batches:
            student, teacher, center = loss_problem(torch, batch, args.crops, K, dtype, bench.device)
            nbytes = loss_bytes(batch, args.crops, K, student.element_size())
            times: dict[tuple[str, str], float] = {}
            peaks: dict[str, float] = {}
            for name, fn in impls.items():
                def fwd(fn=fn):
                    return fn(student, teacher, center, 0.1, 0.04)

                def fwd_bwd(fn=fn):
                    fn(student, teacher, center, 0.1, 0.04)[0].backward()

                times[name, "fwd"] = bench.time_us(fwd)
                times[name, "fwd+bwd"] = bench.time_us(fwd_bwd, grad_to_none=[student])
                times[name, "bwd"] = times[name, "fwd+bwd"] - times[name, "fwd"]
                student.grad = None
                peaks[name] = bench.peak_extra_mib(fwd_bwd)
                student.grad = None
            for op in ("fwd", "bwd", "fwd+bwd"):
                floor_us = nbytes[op] / bench.copy_gbps / 1e3
                print(f"{'':<9} {batch:>4} {dtype_name:>5} {op:>7} {'floor':>8} {floor_us:>9.1f} "
                      f"{bench.copy_gbps:>7.0f} {100:>6.0f}")
                for name in impls:
                    us = times[name, op]
                    gbps = nbytes[op] / us / 1e3
                    vs = [times["eager", op] / us, times["compile", op] / us if "compile" in impls else math.nan]
                    peak = peaks[name] if op == "fwd+bwd" else math.nan
                    print(f"{'':<9} {batch:>4} {dtype_name:>5} {op:>7} {name:>8} {us:>9.1f} {gbps:>7.0f} "
                          f"{100 * gbps / bench.copy_gbps:>6.1f} {fmt(vs[0], '.2f', 'x'):>8} "
                          f"{fmt(vs[1], '.2f', 'x'):>8} {fmt(peak, '.0f'):>9}")
                    what = f"dino_loss/{op}/{name}/B{batch}/crops{args.crops}/K{K}/{dtype_name}"
                    bench.record(what, us, "us")
                    bench.record(what, gbps, "GB/s")
                    if op == "fwd+bwd" and bench.cuda:
                        bench.record(what, peak, "MiB peak extra")
                what = f"dino_loss/{op}/floor/B{batch}/crops{args.crops}/K{K}/{dtype_name}"
                bench.record(what, floor_us, "us")
            del student, teacher, center


def ema_problem(torch, shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    teachers = [torch.randn(s, generator=gen).to(device) for s in shapes]
    students = [torch.randn(s, generator=gen).to(device) for s in shapes]
    return teachers, students


def bench_ema(bench: Bench, ema) -> None:
    torch = bench.torch
    teachers, students = ema_problem(torch, ema_shapes(bench.args), bench.device)
    n_params = sum(t.numel() for t in teachers)
    nbytes = 12 * n_params  # read teacher and student, write teacher, fp32
    impls = {"triton": lambda: ema.ema_update_tensors_(teachers, students, 0.996),
             "foreach": lambda: torch._foreach_lerp_(teachers, students, 1 - 0.996)}
    times = {name: bench.time_us(fn) for name, fn in impls.items()}
    floor_us = nbytes / bench.copy_gbps / 1e3
    header = f"{'ema':<9} {'params':>10} {'impl':>8} {'time us':>9} {'GB/s':>7} {'%copy':>6} {'vs foreach':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    print(f"{'':<9} {n_params:>10} {'floor':>8} {floor_us:>9.1f} {bench.copy_gbps:>7.0f} {100:>6.0f}")
    bench.record(f"ema/floor/params{n_params}/fp32", floor_us, "us")
    for name, us in times.items():
        gbps = nbytes / us / 1e3
        print(f"{'':<9} {n_params:>10} {name:>8} {us:>9.1f} {gbps:>7.0f} {100 * gbps / bench.copy_gbps:>6.1f} "
              f"{times['foreach'] / us:>9.2f}x")
        bench.record(f"ema/{name}/params{n_params}/fp32", us, "us")
        bench.record(f"ema/{name}/params{n_params}/fp32", gbps, "GB/s")


def profile(bench: Bench, dl, ema) -> None:
    """Runs one kernel --iters times, each inside an NVTX range named after --profile.

    `run(prepare())` is one iteration; only `run` is inside the range (for loss_bwd,
    `prepare` runs the forward)."""
    args, torch = bench.args, bench.torch
    target = args.profile
    valid = {"ema": ("triton", "foreach"), "copy": (args.impl,)}.get(target, ("triton", "eager", "compile"))
    if args.impl not in valid:
        sys.exit(f"--profile {target} runs --impl {' or '.join(valid)}, not {args.impl}")
    prepare = lambda: None  # noqa: E731
    if target == "ema":
        teachers, students = ema_problem(torch, ema_shapes(args), bench.device)
        if args.impl == "foreach":
            run = lambda _: torch._foreach_lerp_(teachers, students, 1 - 0.996)  # noqa: E731
        else:
            run = lambda _: ema.ema_update_tensors_(teachers, students, 0.996)  # noqa: E731
    elif target == "copy":
        src = torch.empty(2**22 if args.tiny else 2**28, dtype=torch.float32, device=bench.device).uniform_()
        dst = torch.empty_like(src)
        run = lambda _: dst.copy_(src)  # noqa: E731
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        batch = 2 if args.tiny else args.batch
        student, teacher, center = loss_problem(torch, batch, args.crops, out_dim(args), dtype, bench.device)
        fn = loss_impls(args, torch, dl)[args.impl]
        if target == "loss_fwd":
            run = lambda _: fn(student, teacher, center, 0.1, 0.04)  # noqa: E731
        elif target == "loss_fwd_bwd":
            run = lambda _: fn(student, teacher, center, 0.1, 0.04)[0].backward()  # noqa: E731
        else:
            prepare = lambda: fn(student, teacher, center, 0.1, 0.04)[0]  # noqa: E731
            run = lambda loss: loss.backward()  # noqa: E731
    run(prepare())  # compile and warm up outside the ranges
    nvtx = torch.cuda.nvtx.range if bench.cuda else (lambda name: contextlib.nullcontext())
    for _ in range(args.iters):
        ready = prepare()
        with nvtx(target):
            run(ready)
    if bench.cuda:
        torch.cuda.synchronize()
    print(f"ran {target} ({args.impl}) {args.iters} times in NVTX ranges named {target!r}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import kernel_report

        sys.exit(kernel_report.main(args.report, prog=f"{prog()} --report"))
    if args.device == "cpu":
        # Before triton is imported: the kernels must be decorated as interpreted functions.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    import fastdino_kernels.dino_loss as dl
    import fastdino_kernels.ema as ema
    from fastdino_kernels import use_triton

    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a smoke run")
    if not use_triton(dl._dino_loss_fwd_kernel, device):
        sys.exit(f"the Triton kernels cannot run on {device} in this process (see fastdino_kernels.use_triton)")
    bench = Bench(args, torch, triton)
    print(f"{bench.device_name}, torch {torch.__version__}, triton {triton.__version__}")
    if args.profile:
        profile(bench, dl, ema)
        return
    bench.measure_copy_bandwidth()
    bench_loss(bench, dl)
    bench_ema(bench, ema)
    if args.json:
        bench.write_json()


if __name__ == "__main__":
    main()
