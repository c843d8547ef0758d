"""Memory per rank of the DINO student under DeepSpeed ZeRO stage 0, 1 and 2.

Analytic (from the model's trainable parameter count P, fastdino's numerics: fp32
weights in the module, bf16 only inside autocast, fp32 AdamW):

    stage  parameters  gradients     AdamW moments  fp32 master partition
    0      4 P         4 P           8 P            -   (the module weights are the master)
    1      4 P         4 P           8 P / N        4 P / N
    2      4 P         4 P / N (*)   8 P / N        4 P / N

(*) plus ZeRO's reduce bucket (parallel.bucket_elements x 4 bytes at most). The
teacher (4 P, never sharded) and activations come on top. With --weight-bytes 2 the
table shows a bf16-weights engine instead (parameters and gradients 2 bytes, fp32
master 4 P at stage 0).

--measure launches DeepSpeed (torchrun, gloo on CPU) at world sizes 1 and 2, runs
one optimizer step under each stage and reads what the optimizer allocated on each
rank: AdamW's exp_avg + exp_avg_sq and ZeRO's fp32 master partition.

    python bench/bench_memory.py                                   # ViT-S/16 and ViT-B/16, N = 1..64
    fastdino bench memory --measure --json cpu_memory.jsonl         # + measured rows (vit_small, K = 65536)
    fastdino bench memory --measure --arch vit_tiny --out-dim 4096  # a quicker measurement
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)


def per_rank_bytes(trainable_params: int, stage: int, world_size: int, weight_bytes: int = 4,
                   bucket_elements: int = 0) -> dict:
    """Bytes per rank of the student's parameters, gradients, AdamW moments and fp32 master copy."""
    shard = math.ceil(trainable_params / world_size)
    p = trainable_params
    return {
        "params": weight_bytes * p,
        "grads": weight_bytes * (shard + min(bucket_elements, p) if stage == 2 else p),
        "optimizer_state": 8 * (shard if stage >= 1 else p),
        "master_params": 4 * shard if stage >= 1 else (4 * p if weight_bytes != 4 else 0),
    }


def model_overrides(arch: str, out_dim: int) -> list[str]:
    return [f"model.arch={arch}", "model.patch_size=16", f"model.out_dim={out_dim}", "data.path=unused"]


def trainable_params(arch: str, out_dim: int) -> int:
    from fastdino.config import load_config
    from fastdino.ssl import build_student_teacher

    with torch.device("meta"):
        student = build_student_teacher(load_config(None, model_overrides(arch, out_dim)).model).student
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def analytic_table(models: list[tuple[str, int]], weight_bytes: int) -> list[dict]:
    rows = []
    for arch, out_dim in models:
        p = trainable_params(arch, out_dim)
        for stage in (0, 1, 2):
            for n in WORLD_SIZES:
                rows.append({"arch": f"{arch}/16", "out_dim": out_dim, "trainable_params": p, "stage": stage,
                             "world_size": n, **per_rank_bytes(p, stage, n, weight_bytes)})
    return rows


def print_table(rows: list[dict]) -> None:
    mib = 2 ** 20
    print(f"{'model':12s} {'stage':>5s} {'ranks':>5s} {'params MiB':>11s} {'grads MiB':>10s} {'Adam MiB':>9s} "
          f"{'master MiB':>11s} {'total MiB':>10s}")
    for r in rows:
        total = r["params"] + r["grads"] + r["optimizer_state"] + r["master_params"]
        print(f"{r['arch']:12s} {r['stage']:5d} {r['world_size']:5d} {r['params'] / mib:11.1f} {r['grads'] / mib:10.1f} "
              f"{r['optimizer_state'] / mib:9.1f} {r['master_params'] / mib:11.1f} {total / mib:10.1f}")


def worker(arch: str, out_dim: int, out: Path) -> None:
    """One rank under torchrun: for each stage, one step of the student, then its optimizer bytes."""
    from fastdino.config import load_config
    from fastdino.parallel import init_distributed, memory_bytes
    from fastdino.train.builders import build_dino_step

    rows = []
    for stage in (0, 1, 2):
        cfg = load_config(None, [*model_overrides(arch, out_dim), "device=cpu", "model.drop_path_rate=0.0",
                                 "data.batch_size=1", f"parallel.zero_stage={stage}"])
        env = init_distributed(torch.device("cpu"), cfg.parallel.timeout_s, need_group=True)
        torch.manual_seed(0)
        runner = build_dino_step(cfg, torch.device("cpu"), env).runner
        for group in runner.param_groups:
            group["lr"] = 1e-4
        crops = [torch.randn(1, 3, 32, 32)] * 2
        runner.backward(runner(crops).float().square().mean())
        runner.step()
        rows.append({"stage": stage, "rank": env.rank, "world_size": env.world_size, **memory_bytes(runner)})
        del runner
    out.with_name(f"{out.name}.rank{rows[0]['rank']}").write_text(json.dumps(rows))


def measure(arch: str, out_dim: int, world_sizes: list[int]) -> list[dict]:
    rows = []
    for n in world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "memory.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                       str(29700 + n), str(Path(__file__).resolve()), "--worker", "--arch", arch, "--out-dim",
                       str(out_dim), "--worker-out", str(out)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise SystemExit(f"bench_memory: torchrun at world size {n} failed: "
                                 f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ''}")
            for rank in range(n):
                rows.extend(json.loads(out.with_name(f"memory.json.rank{rank}").read_text()))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weight-bytes", type=int, choices=[2, 4], default=4,
                   help="bytes per module weight and gradient (fastdino: 4, fp32 weights with bf16 autocast)")
    p.add_argument("--measure", action="store_true", help="also run DeepSpeed on CPU at world sizes 1 and 2")
    p.add_argument("--arch", default="vit_small", help="model for --measure (default vit_small)")
    p.add_argument("--out-dim", type=int, default=65536, help="K for --measure (default 65536)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="for --measure (default 1 2)")
    p.add_argument("--json", metavar="FILE", help="append the measured rows to bench/results/FILE")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.arch, args.out_dim, args.worker_out)
        return
    if args.measure:
        from fastdino._requires import MissingPackageError, require_deepspeed

        try:
            require_deepspeed("bench memory --measure")
        except MissingPackageError as error:
            sys.exit(str(error))  # before the table: torchrun's ranks would only fail, each with a traceback
    print_table(analytic_table([("vit_small", 65536), ("vit_base", 65536)], args.weight_bytes))
    if not args.measure:
        return
    p_count = trainable_params(args.arch, args.out_dim)
    measured = measure(args.arch, args.out_dim, args.world_sizes)
    print(f"\nmeasured, {args.arch}/16 K={args.out_dim} (P = {p_count:,} trainable), bytes per rank:")
    print(f"{'stage':>5s} {'ranks':>5s} {'rank':>4s} {'Adam measured':>14s} {'Adam analytic':>14s} "
          f"{'master measured':>16s} {'master analytic':>16s}")
    from fastdino.runinfo import benchmark_context

    context = {**benchmark_context(torch.device("cpu"), [sys.executable, *sys.argv]), "backend": "gloo"}
    json_rows = []
    for row in measured:
        expected = per_rank_bytes(p_count, row["stage"], row["world_size"])
        print(f"{row['stage']:5d} {row['world_size']:5d} {row['rank']:4d} {row['optimizer_state']:14,d} "
              f"{expected['optimizer_state']:14,d} {row['master_params']:16,d} {expected['master_params']:16,d}")
        for key in ("optimizer_state", "master_params"):
            json_rows.append({
                "what": f"{key} bytes per rank, {args.arch}/16 K={args.out_dim}, ZeRO stage {row['stage']}, "
                        f"world size {row['world_size']}, rank {row['rank']} (analytic {expected[key]})",
                "value": row[key], "unit": "bytes", **context})
    if args.json:
        RESULTS_DIR.mkdir(exist_ok=True)
        with open(RESULTS_DIR / args.json, "a") as f:
            for row in json_rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
