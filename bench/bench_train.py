"""End-to-end DINO training-step benchmark: fastdino's step against the official step,
same model size, same inputs, side by side in one run.

    fastdino   what `fastdino train` runs: packed multi-crop student (one pass over all crops,
               xformers BlockDiagonalMask where its kernels run, else SDPA per resolution),
               subset stochastic depth, the last block at the class tokens only, fused DINO
               loss and EMA kernels on CUDA, foreach per-parameter clipping, fused AdamW, bf16
               autocast on CUDA; `model.compile=true` and
               `model.activation_checkpointing=true` switch on from the config as in training.
    official   what facebookresearch/dino's train_one_epoch does, written here on the same
               modules: one backbone forward per resolution with plain (math) attention,
               every token through the last block (fastdino's computes only the class tokens there),
               per-sample drop path, the per-pair DINOLoss loop, per-parameter clipping with a
               host sync per parameter, fp16 autocast with GradScaler (as it ships:
               use_fp16=True), the `loss.item()` finiteness check, and the per-tensor EMA loop.
On the CPU both run in fp32 (CPU autocast in fp16 is not what the official runs).

Per variant: img/s over timed steps with no synchronisation inside the fastdino step, MFU
(analytic FLOPs of fastdino.metrics against 800 TFLOP/s bf16 on CUDA), peak memory
(torch.cuda.max_memory_allocated; not measured on the CPU), and a step breakdown (data wait,
teacher forward, student forward, loss, backward, optimizer, EMA) from a separate pass with
CUDA events (perf_counter on the CPU) so that timing does not slow the img/s pass.

    fastdino bench train --preset h100 --json h100_train.jsonl         # ViT-S/16 + ViT-B/16, B 64 + 128, one H100
    fastdino bench train --preset tiny --json cpu_train.jsonl          # tiny, on the CPU
    fastdino bench train --config configs/vit_small_16.yaml data.batch_size=128 data.n_local_crops=10
    fastdino bench train --preset tiny --profile traces/               # Chrome/Perfetto traces, NVTX ranges
    fastdino bench train --config configs/vit_small_16.yaml --data train.beton   # real data

On CUDA, configurations with a performance target are checked against it and the gap is
printed: 2 x 224 + 10 x 96 crops, K = 65536, batch 128 on one H100: ViT-S/16 at least 3,000
img/s, 3x the official step's img/s and at most half its peak memory; ViT-B/16 at least 750 img/s.

`key=value` arguments override the config (and every configuration of a preset).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("data_wait", "teacher_forward", "student_forward", "loss", "backward", "optimizer", "ema")
VARIANTS = ("fastdino", "official")

# The H100 preset: 2 x 224 + 10 x 96 crops, K = 65536, batch 64 and 128 per GPU.
H100_MATRIX = [[f"model.arch={arch}", "model.patch_size=16", f"data.batch_size={batch}", "data.n_local_crops=10",
                "data.global_size=224", "data.local_size=96", "model.out_dim=65536"]
               for arch in ("vit_small", "vit_base") for batch in (64, 128)]
TINY = [["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "data.global_size=32",
         "data.local_size=16", "data.n_local_crops=4", "data.batch_size=8", "model.out_dim=1024",
         "model.head_hidden_dim=256", "model.head_bottleneck_dim=64"]]
# fastdino's performance targets on one H100 (2 x 224 + 10 x 96, K = 65536, bf16, batch 128), keyed by
# (arch, patch, batch): (fastdino img/s, img/s over the official step, peak memory over the official's).
TARGETS = {("vit_small", 16, 128): {"img_per_s": 3000.0, "speedup": 3.0, "memory_ratio": 0.5},
           ("vit_base", 16, 128): {"img_per_s": 750.0}}
PRESETS = {"h100": (H100_MATRIX, dict(steps=30, warmup=10, breakdown_steps=10)),
           "tiny": (TINY, dict(steps=4, warmup=2, breakdown_steps=2))}


def variant_list(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant {unknown[0] if unknown else text!r}; "
                                         f"choose from {', '.join(VARIANTS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastdino bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.batch_size=128")
    p.add_argument("--config", help="experiment YAML on top of configs/default.yaml")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="h100: ViT-S/16 and ViT-B/16, 2x224 + 10x96, K=65536, batch 64 and 128; tiny: a CPU smoke run")
    # One comma-separated value, so that key=value overrides may follow it.
    p.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                   help="comma-separated, from fastdino,official (default both)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (one fixed random batch, no loading) or a .beton path (live multi-crop loader)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=int, help="timed steps for img/s (default 30 on CUDA, 5 on CPU; preset's)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 10 on CUDA, 2 on CPU; preset's)")
    p.add_argument("--breakdown-steps", type=int, help="steps of the synchronised breakdown pass")
    p.add_argument("--json", metavar="OUT", help="append one JSON row per measurement to OUT "
                                                 "(a bare file name goes to bench/results/)")
    p.add_argument("--profile", metavar="DIR", help="also write a torch.profiler Chrome trace of a few steps "
                                                    "per variant to DIR, stages in record_function/NVTX ranges")
    p.add_argument("--profile-steps", type=int, default=3, help="steps in each profile trace (default 3)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- stages: timing and ranges

class NoStages:
    """The img/s pass: stages cost nothing."""

    def __call__(self, name):
        return contextlib.nullcontext()


class TimedStages:
    """The breakdown pass: CUDA events around each stage (read after the step's synchronisation),
    or perf_counter on the CPU, where every op finishes before it returns."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = {stage: 0.0 for stage in STAGES}
        self.pending: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pending.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self.totals[name] += (time.perf_counter() - start) * 1e3

    def add_ms(self, name: str, ms: float) -> None:
        self.totals[name] += ms

    def end_step(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                self.totals[name] += start.elapsed_time(end)
            self.pending.clear()


class ProfiledStages:
    """The --profile pass: each stage a record_function range (and an NVTX range on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, name):
        with torch.profiler.record_function(name):
            if self.cuda:
                with torch.cuda.nvtx.range(name):
                    yield
            else:
                yield


# ---------------------------------------------------------------- the two steps

def autocast(device: torch.device, dtype):
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class FastdinoStep:
    """The step `fastdino train` runs (fastdino.ssl.DINOMetaArch, built by
    fastdino.train.builders.build_dino_step as the trainer builds it), with the schedules held at
    their step-0 values and the epoch past the last-layer freeze (the steady state)."""

    name = "fastdino"

    def __init__(self, cfg, device: torch.device):
        from fastdino.parallel import DistEnv
        from fastdino.train.builders import build_dino_step
        from fastdino.train.schedules import build_schedules

        self.step = build_dino_step(cfg, device, DistEnv(rank=0, world_size=1, local_rank=0))
        self.student = self.step.student
        values = build_schedules(cfg, steps_per_epoch=1, total_batch_size=cfg.data.batch_size).at(0)
        for group in self.step.runner.param_groups:
            group.update(lr=lr(cfg), weight_decay=values["wd"] if group["decay"] else 0.0)
        self.teacher_temp, self.momentum = values["teacher_temp"], values["momentum"]

    def __call__(self, crops, stage) -> None:
        self.step.train_step(crops, self.teacher_temp, self.momentum, stage=stage)


class OfficialStep:
    """facebookresearch/dino main_dino.py train_one_epoch, on the same model size."""

    name = "official"

    def __init__(self, cfg, device: torch.device):
        from omegaconf import OmegaConf

        from fastdino.ssl import build_student_teacher

        # The official model: plain attention, one forward per resolution, per-sample drop path.
        model_cfg = OmegaConf.merge(cfg.model, {"attn_backend": "math", "packed_crops": False,
                                                "drop_path_impl": "per_sample", "compile": False,
                                                "activation_checkpointing": False})
        nets = build_student_teacher(model_cfg)
        for net in (nets.student, nets.teacher):  # official VisionTransformer.forward: every block at every token
            net.backbone.forward = lambda x, backbone=net.backbone: backbone.forward_features(x)[:, 0]
        self.student, self.teacher = nets.student.to(device), nets.teacher.to(device)
        self.cfg, self.device = cfg, device
        self.ncrops = 2 + cfg.data.n_local_crops
        self.center = torch.zeros(1, cfg.model.out_dim, device=device)
        # main_dino.py's utils.get_params_groups: biases and 1-D parameters get no weight decay
        params = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        regularized = [p for n, p in params if not (n.endswith(".bias") or p.ndim <= 1)]
        not_regularized = [p for n, p in params if n.endswith(".bias") or p.ndim <= 1]
        self.optimizer = torch.optim.AdamW([{"params": regularized, "weight_decay": cfg.optim.weight_decay},
                                            {"params": not_regularized, "weight_decay": 0.0}],
                                           lr=lr(cfg), betas=tuple(cfg.optim.betas))
        self.epoch = cfg.optim.freeze_last_layer
        cuda = device.type == "cuda"
        self.amp_dtype = torch.float16 if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if cuda else None

    def dino_loss(self, student_output, teacher_output):
        from fastdino_kernels.dino_loss import dino_loss_official_eager

        dino = self.cfg.dino
        loss, teacher_sum = dino_loss_official_eager(student_output, teacher_output, self.center.view(-1),
                                                     dino.student_temp, dino.teacher_temp)
        with torch.no_grad():  # official update_center (single process: the all_reduce is a no-op)
            batch_center = teacher_sum.view(1, -1) / len(teacher_output)
            self.center = self.center * dino.center_momentum + batch_center * (1 - dino.center_momentum)
        return loss

    def __call__(self, crops, stage) -> None:
        cfg = self.cfg
        with autocast(self.device, self.amp_dtype):
            with stage("teacher_forward"):
                teacher_output = self.teacher(crops[:2])
            with stage("student_forward"):
                student_output = self.student(crops)
            with stage("loss"):
                loss = self.dino_loss(student_output, teacher_output)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError("official step: non-finite loss")
        with stage("backward"):
            self.optimizer.zero_grad()
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        with stage("optimizer"):
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if cfg.optim.clip_grad > 0:
                for p in self.student.parameters():  # official utils.clip_gradients
                    if p.grad is not None:
                        param_norm = p.grad.data.norm(2)
                        clip_coef = cfg.optim.clip_grad / (param_norm.item() + 1e-6)
                        if clip_coef < 1:
                            p.grad.data.mul_(clip_coef)
            if self.epoch < cfg.optim.freeze_last_layer:  # official utils.cancel_gradients_last_layer
                for n, p in self.student.named_parameters():
                    if "last_layer" in n:
                        p.grad = None
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        with stage("ema"):
            with torch.no_grad():
                m = cfg.dino.momentum_teacher
                for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                    param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def lr(cfg) -> float:
    return cfg.optim.lr * cfg.data.batch_size / 256


# ---------------------------------------------------------------- data

class SyntheticData:
    """The first batch of the training loader on data.path=synthetic, handed out again and again:
    no loading cost, and every variant sees exactly the same inputs."""

    def __init__(self, cfg, device: torch.device):
        from fastdino.train.builders import build_training_loader

        self.crops, _labels = next(iter(build_training_loader(cfg, device).iter_epoch(0)))

    def __iter__(self):
        while True:
            yield self.crops


class BetonData:
    """The training loader over a .beton, as the trainer builds it, epoch after epoch (same seed for
    every variant, so the same batches in the same order)."""

    def __init__(self, cfg, device: torch.device):
        from fastdino.train.builders import build_training_loader

        self.loader = build_training_loader(cfg, device)

    def __iter__(self):
        epoch = 0
        while True:
            for crops, _labels in self.loader.iter_epoch(epoch):
                yield crops
            epoch += 1


# ---------------------------------------------------------------- measuring one variant

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, batches, n: int, stage, timed: TimedStages | None = None) -> None:
    for _ in range(n):
        start = time.perf_counter()
        crops = next(batches)
        if timed is not None:
            timed.add_ms("data_wait", (time.perf_counter() - start) * 1e3)
        step(crops, stage)
        if timed is not None:
            timed.end_step()


def measure(variant_cls, cfg, args, device: torch.device, data_factory, trace_dir: Path | None, tag: str) -> dict:
    """img/s, peak memory and breakdown of one variant; raises torch.cuda.OutOfMemoryError through."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    step = variant_cls(cfg, device)
    batches = iter(data_factory())
    batch = cfg.data.batch_size
    run_steps(step, batches, args.warmup, NoStages())
    synchronize(device)
    start = time.perf_counter()
    run_steps(step, batches, args.steps, NoStages())
    synchronize(device)
    elapsed = time.perf_counter() - start
    result = {"img_per_s": args.steps * batch / elapsed, "step_ms": elapsed / args.steps * 1e3}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    timed = TimedStages(device)
    run_steps(step, batches, args.breakdown_steps, timed, timed)
    result["breakdown_ms"] = {k: v / max(args.breakdown_steps, 1) for k, v in timed.totals.items()}
    result["attn_backend"] = attention_backend_used(step, device)
    if trace_dir is not None:
        result["trace"] = str(profile(step, batches, args, device, trace_dir / f"{tag}_{step.name}.json"))
    del step, batches
    gc.collect()
    return result


def attention_backend_used(step, device: torch.device) -> str:
    from fastdino.models import resolve_attention_backend

    return resolve_attention_backend(step.student.backbone.blocks[0].attn.backend, device)


def profile(step, batches, args, device: torch.device, path: Path) -> Path:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    stages = ProfiledStages(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        for i in range(args.profile_steps):
            with torch.profiler.record_function(f"step_{i}"):
                with stages("data_wait"):
                    crops = next(batches)
                step(crops, stages)
            synchronize(device)
    prof.export_chrome_trace(str(path))
    return path


# ---------------------------------------------------------------- reporting

class Report:
    def __init__(self, args, device: torch.device):
        from fastdino.runinfo import benchmark_context

        self.args, self.device = args, device
        self.rows: list[dict] = []
        self.common = benchmark_context(device, ["fastdino", "bench", "train", *sys.argv[1:]])
        self.device_name = self.common["device"]

    def record(self, what: str, value, unit: str, **extra) -> None:
        self.rows.append(dict(what=what, value=value, unit=unit, **extra))

    def write_json(self, out: str) -> Path:
        path = Path(out)
        if path.parent == Path("."):
            path = RESULTS / path
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for row in self.rows:
                f.write(json.dumps({**row, **self.common}) + "\n")
        return path


def config_tag(cfg) -> str:
    m, d = cfg.model, cfg.data
    return (f"{m.arch}{m.patch_size}_d{m.depth}_B{d.batch_size}_2x{d.global_size}+{d.n_local_crops}x{d.local_size}"
            f"_K{m.out_dim}")


def fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_table(tag: str, flops: float, results: dict) -> None:
    print(f"\n{tag}: {flops / 1e9:.1f} GFLOP per image (analytic)")
    header = (f"{'variant':<9} {'img/s':>9} {'MFU':>6} {'peak GiB':>8} {'step ms':>8} | "
              + " ".join(f"{s.replace('_forward', '_fwd'):>11}" for s in STAGES) + "  (ms, breakdown pass)")
    print(header + "\n" + "-" * len(header))
    for name, r in results.items():
        if "oom" in r:
            print(f"{name:<9} out of memory: {r['oom']}")
            continue
        img_per_s = f"{r['img_per_s']:.1f}" if r["img_per_s"] >= 10 else f"{r['img_per_s']:.3f}"
        row = (f"{name:<9} {img_per_s:>9} {fmt(r.get('mfu'), '>6.1%'):>6} "
               f"{fmt(r.get('peak_memory_gib'), '>8.2f'):>8} {r['step_ms']:>8.1f} | ")
        print(row + " ".join(f"{r['breakdown_ms'][s]:>11.2f}" for s in STAGES) + f"  attention={r['attn_backend']}")
    ok = {n: r for n, r in results.items() if "oom" not in r}
    if {"fastdino", "official"} <= ok.keys():
        speedup = ok["fastdino"]["img_per_s"] / ok["official"]["img_per_s"]
        line = f"fastdino / official: {speedup:.2f}x img/s"
        if "peak_memory_gib" in ok["fastdino"]:
            line += f", {ok['fastdino']['peak_memory_gib'] / ok['official']['peak_memory_gib']:.2f}x peak memory"
        print(line)


def bench_config(cfg, args, device, report: Report) -> None:
    from fastdino import metrics

    flops = metrics.flops_per_image_from_config(cfg)
    peak = metrics.peak_flops(device.type)
    tag = config_tag(cfg)
    if args.data == "synthetic":
        data_factory = lambda: SyntheticData(cfg, device)  # noqa: E731
    else:
        data_factory = lambda: BetonData(cfg, device)  # noqa: E731
    precision = {"fastdino": "bf16" if device.type == "cuda" else "fp32",
                 "official": "fp16+GradScaler" if device.type == "cuda" else "fp32"}
    trace_dir = Path(args.profile) if args.profile else None
    results = {}
    for name in args.variants:
        variant_cls = FastdinoStep if name == "fastdino" else OfficialStep
        context = dict(variant=name, config=tag, precision=precision[name], data=args.data, steps=args.steps,
                       batch_size=cfg.data.batch_size)
        try:
            r = measure(variant_cls, cfg, args, device, data_factory, trace_dir, tag)
        except torch.cuda.OutOfMemoryError as error:
            r = {"oom": " ".join(str(error).split())[:200]}
        if "oom" in r:  # outside the except clause: the traceback no longer holds the variant's tensors
            gc.collect()
            torch.cuda.empty_cache()
            results[name] = r
            report.record(f"train_step/{tag}/{name}/out_of_memory", None, "OOM", detail=r["oom"], **context)
            continue
        r["gflops_per_s"] = r["img_per_s"] * flops / 1e9
        r["mfu"] = metrics.mfu(r["img_per_s"], flops, peak)
        results[name] = r
        context["attn_backend"] = r["attn_backend"]
        base = f"train_step/{tag}/{name}"
        report.record(f"{base}/throughput", r["img_per_s"], "img/s", **context)
        report.record(f"{base}/step_time", r["step_ms"], "ms", **context)
        report.record(f"{base}/achieved", r["gflops_per_s"], "GFLOP/s", flops_per_image=flops, **context)
        if r["mfu"] is not None:
            report.record(f"{base}/mfu", r["mfu"], "fraction of 800 TFLOP/s", flops_per_image=flops, **context)
        if "peak_memory_gib" in r:
            report.record(f"{base}/peak_memory", r["peak_memory_gib"], "GiB (torch.cuda.max_memory_allocated)",
                          **context)
        for stage, ms in r["breakdown_ms"].items():
            report.record(f"{base}/breakdown/{stage}", ms, "ms", breakdown_steps=args.breakdown_steps, **context)
        if "trace" in r:
            print(f"profile trace: {r['trace']}")
    print_table(tag, flops, results)
    if device.type == "cuda":
        check_targets(cfg, results, report)
    ok = {n: r for n, r in results.items() if "oom" not in r}
    if {"fastdino", "official"} <= ok.keys():
        report.record(f"train_step/{tag}/speedup", ok["fastdino"]["img_per_s"] / ok["official"]["img_per_s"],
                      "x (fastdino img/s / official img/s)", config=tag)
        if "peak_memory_gib" in ok["fastdino"]:
            report.record(f"train_step/{tag}/memory_ratio",
                          ok["fastdino"]["peak_memory_gib"] / ok["official"]["peak_memory_gib"],
                          "x (fastdino peak / official peak)", config=tag)


def check_targets(cfg, results: dict, report: Report) -> None:
    """Measured against fastdino's H100 targets (TARGETS), where this configuration has them."""
    m, d = cfg.model, cfg.data
    targets = TARGETS.get((m.arch, m.patch_size, d.batch_size))
    if targets is None or (d.n_local_crops, d.global_size, d.local_size, m.out_dim) != (10, 224, 96, 65536):
        return
    fast, official = results.get("fastdino", {}), results.get("official", {})
    measured = {"img_per_s": fast.get("img_per_s")}
    if "img_per_s" in fast and "img_per_s" in official:
        measured["speedup"] = fast["img_per_s"] / official["img_per_s"]
    if "peak_memory_gib" in fast and "peak_memory_gib" in official:
        measured["memory_ratio"] = fast["peak_memory_gib"] / official["peak_memory_gib"]
    for key, target in targets.items():
        value = measured.get(key)
        if value is None:
            print(f"target {key} {target:g}: not measured")
            continue
        met = value <= target if key == "memory_ratio" else value >= target
        print(f"target {key} {'<=' if key == 'memory_ratio' else '>='} {target:g}: measured {value:.4g} "
              f"({'met' if met else f'missed, {value / target:.0%} of the target'})")
        report.record(f"train_step/{config_tag(cfg)}/target/{key}", value, key, target=target, met=met)


def main(argv=None) -> None:
    args = parse_args(argv)
    from fastdino.config import load_config
    from fastdino.runinfo import resolve_device, setup_logging

    setup_logging()
    try:
        device = resolve_device(args.device)
    except RuntimeError as error:
        sys.exit(f"fastdino bench train: {error}")
    if args.data != "synthetic" and not Path(args.data).is_file():
        sys.exit(f"fastdino bench train: --data {args.data}: no such file (give a .beton or 'synthetic')")
    matrix, preset_defaults = PRESETS[args.preset] if args.preset else ([[]], {})
    cuda = device.type == "cuda"
    for key, cuda_default, cpu_default in (("steps", 30, 5), ("warmup", 10, 2), ("breakdown_steps", 10, 3)):
        if getattr(args, key) is None:
            setattr(args, key, preset_defaults.get(key, cuda_default if cuda else cpu_default))
    if args.steps < 1 or args.warmup < 0 or args.breakdown_steps < 1:
        sys.exit("fastdino bench train: --steps and --breakdown-steps must be >= 1, --warmup >= 0")
    report = Report(args, device)
    print(f"{report.device_name}, torch {torch.__version__}, triton {report.common['triton']}, "
          f"xformers {report.common['xformers']}; {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.breakdown_steps} breakdown steps; data: {args.data}")
    for overrides in matrix:
        data_path = args.data if args.data != "synthetic" else "synthetic"
        cfg = load_config(args.config, [*overrides, f"data.path={data_path}", *args.overrides])
        bench_config(cfg, args, device, report)
    load = report.common["load_average_1min_at_start"]
    # torch's threads spin-wait: other work on the cores skews every number (this run's own threads count too)
    if device.type == "cpu" and load > 0.75 * len(os.sched_getaffinity(0)):
        print(f"warning: measured on a busy machine (1-minute load {load} at the start, {len(os.sched_getaffinity(0))} "
              f"cores): CPU timings vary with the load far more than the variants differ; compare rows made at the "
              f"same low load", file=sys.stderr)
    if args.json:
        print(f"appended {len(report.rows)} rows to {report.write_json(args.json)}")


if __name__ == "__main__":
    main()
