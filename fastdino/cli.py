"""The `fastdino` command (also `python -m fastdino`).

Every command has --help; every anticipated error is one line on stderr and a
non-zero exit (set FASTDINO_DEBUG=1 to see the traceback instead).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Idle OpenMP threads spin by default, which starves FFCV's decode threads and any
# other process on small CPU machines; must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _train(args) -> int:
    from fastdino.parallel import shutdown_distributed
    from fastdino.train.run_folder import launch_config
    from fastdino.train.trainer import Trainer

    cfg = launch_config(args.config, args.overrides, args.resume)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        summary = trainer.train()
    finally:
        shutdown_distributed()
    if trainer.is_main:
        print(json.dumps({"output_dir": cfg.output_dir, "steps": summary["steps"],
                          "final_loss": summary["last"].get("loss"), "final_knn": summary["final_knn"],
                          "world_size": trainer.dist.world_size, "zero_stage": cfg.parallel.zero_stage,
                          "memory_bytes_rank0": summary["memory"]}))
    return 0


def _convert(args) -> int:
    from fastdino.data import convert_folder

    report = convert_folder(args.src, args.out, max_resolution=args.max_resolution,
                            jpeg_quality=args.jpeg_quality, storage=args.storage, num_workers=args.workers)
    print(f"wrote {report['written']} images to {args.out}; skipped {len(report['skipped'])} "
          f"(see {args.out}.report.json)")
    return 0


def _eval_device(args):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")


def _read_backbone(args, device):
    """(backbone on `device`, the weights read) from CHECKPOINT, any kind fastdino.eval.export.read_backbone
    reads; which file a folder stood for goes to stderr."""
    from fastdino.eval.export import read_backbone

    backbone, weights = read_backbone(args.checkpoint, args.which, args.arch, args.patch_size)
    if Path(args.checkpoint).is_dir():
        print(f"reading {weights.source}", file=sys.stderr)
    return backbone.to(device), weights


def _eval_backbone(args, device):
    """(backbone on `device`, its arch, the image size to evaluate at): the run's eval size for
    training checkpoints, else the model's img_size."""
    backbone, weights = _read_backbone(args, device)
    size = args.size or weights.eval_size or backbone.patch_embed.img_size
    return backbone, args.arch or weights.arch, size


def _check_labelled_betons(args) -> None:
    """--train and --val must be labelled .beton files; checked before any image is decoded."""
    from fastdino.data.decode import check_beton

    check_beton(args.train, source="--train", need_labels=True)
    check_beton(args.val, source="--val", need_labels=True)


def _init_distributed_from_env(device) -> tuple[int, int]:
    """(rank, world size): under torchrun or the deepspeed launcher (WORLD_SIZE > 1) joins the
    process group (nccl on CUDA, gloo on CPU); otherwise (0, 1)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _eval_knn(args) -> int:
    import torch.distributed as dist

    from fastdino.data import eval_loader
    from fastdino.eval.knn import all_gather_rows, drop_high_variance_dimensions, extract_features, knn_classify

    device = _eval_device(args)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        import torch

        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    rank, world_size = _init_distributed_from_env(device)
    backbone, _, size = _eval_backbone(args, device)
    _check_labelled_betons(args)

    def embed(beton: str):
        """This rank's shard of the file, then every rank's rows in file order."""
        loader = eval_loader(beton, args.batch_size, size=size, device=str(device), rank=rank, world_size=world_size)
        return all_gather_rows(*extract_features(backbone, loader, device))

    train, val = embed(args.train), embed(args.val)
    train_features, val_features = train[0], val[0]
    if args.drop_high_variance:
        train_features, val_features = drop_high_variance_dimensions(train_features, val_features,
                                                                     args.drop_high_variance)
    results = {}
    for k in args.k:
        results[f"k={k}"] = knn_classify(train_features, train[1], val_features, val[1], k=k,
                                         temperature=args.temperature)
        if rank == 0:
            print(f"{args.which} k-NN k={k:<4d} top-1 {results[f'k={k}']['top1']:.2f}%")
    if args.json and rank == 0:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if world_size > 1:
        dist.destroy_process_group()
    return 0


def _eval_linear(args) -> int:
    from tqdm import tqdm

    from fastdino.data import eval_loader
    from fastdino.eval.linear import extract_probe_features, linear_probe, probe_defaults

    device = _eval_device(args)
    backbone, arch, size = _eval_backbone(args, device)
    _check_labelled_betons(args)
    default_blocks, default_avgpool = probe_defaults(arch)
    n_last_blocks = min(args.n_last_blocks or default_blocks, len(backbone.blocks))
    avgpool = default_avgpool if args.avgpool is None else args.avgpool

    def features(beton: str, name: str):
        loader = eval_loader(beton, args.batch_size, size=size, device=str(device))
        batches = tqdm(loader, desc=f"{name} features", dynamic_ncols=True, leave=False)
        return extract_probe_features(backbone, batches, device, n_last_blocks, avgpool)

    train, val = features(args.train, "train"), features(args.val, "val")
    results = linear_probe(*train, *val, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           seed=args.seed, progress=True)
    results.update(which=args.which, n_last_blocks=n_last_blocks, avgpool=avgpool, epochs=args.epochs,
                   lr=args.lr, batch_size=args.batch_size, size=size)
    top5 = f", top-5 {results['top5']:.2f}%" if "top5" in results else ""
    print(f"{args.which} linear probe ({n_last_blocks} block{'s' if n_last_blocks > 1 else ''}"
          f"{' + avgpool' if avgpool else ''}, {results['feature_dim']}-d): top-1 {results['top1']:.2f}%{top5} "
          f"(train top-1 {results['train_top1']:.2f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _plot(args) -> int:
    from fastdino.eval.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _export(args) -> int:
    from fastdino.eval.export import export_weights

    summary = export_weights(args.checkpoint, args.out, args.format, which=args.which, with_head=args.with_head,
                             arch=args.arch, patch_size=args.patch_size)
    if Path(args.checkpoint).is_dir():
        print(f"reading {summary['source']}", file=sys.stderr)
    step = f" of step {summary['source_step']}" if summary["source_step"] is not None else ""
    print(f"wrote {summary['out']}: {args.format} layout, {summary['which']} {summary['arch']}/"
          f"{summary['patch_size']}{step}, {summary['tensors']} tensors{' with the DINO head' if summary['with_head'] else ''}")
    return 0


def _add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """CHECKPOINT and how to read it, for the commands that take any backbone weights file."""
    parser.add_argument("checkpoint", help="fastdino training checkpoint (.pt, a DeepSpeed step folder, or a run "
                                           "folder: its newest checkpoint), official DINO weights (backbone-only "
                                           "or full checkpoint), timm-layout or safetensors file")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher",
                        help="network of a training checkpoint (default teacher)")
    parser.add_argument("--arch", choices=["vit_tiny", "vit_small", "vit_base"],
                        help="architecture (default: what the file records, else what its tensor shapes show)")
    parser.add_argument("--patch-size", type=int,
                        help="patch size (default: what the file records, else what its tensor shapes show)")


def _viz_attention(args) -> int:
    from fastdino.eval.draw import draw_attention_for_files

    backbone, _ = _read_backbone(args, "cpu")
    paths = draw_attention_for_files(backbone, backbone.patch_embed.patch_size, args.images, Path(args.out),
                                     size=args.size)
    for path in paths:
        print(path)
    return 0


def _bench_script(args) -> int:
    """Runs bench/bench_<name>.py (scripts, not part of the installed package) with the given arguments."""
    import runpy

    from fastdino.runinfo import REPO_ROOT

    script = REPO_ROOT / "bench" / f"bench_{args.bench_name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"benchmark script not found: {script} (run from a source checkout)")
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _demo(args) -> int:
    from fastdino.demo import run_demo

    summary = run_demo(Path(args.output_dir), overrides=args.overrides)
    print(json.dumps(summary, indent=2))
    return 0


BENCH_SCRIPTS = {
    "kernels": "time the Triton loss and EMA kernels against their baselines and the bandwidth floor",
    "loader": "multi-crop loading img/s and CPU cores: the official PIL recipe against fastdino's loader",
    "memory": "parameter, gradient and optimizer-state bytes per rank under ZeRO 0/1/2 (analytic; --measure runs DeepSpeed)",
    "train": "end-to-end training step img/s, MFU, memory and breakdown: fastdino against the official step",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdino", description="Fast DINO self-supervised ViT training.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a tiny ViT on scikit-learn's digits on CPU, end to end",
                               description="Converts digits to .beton, trains DINO, reports k-NN before/after "
                                           "and draws attention maps into OUTPUT_DIR (runs/demo).")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on top of configs/demo.yaml")
    demo.set_defaults(func=_demo)

    train = commands.add_parser(
        "train", help="train DINO from a config file", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Loads configs/default.yaml, then --config, then key=value overrides (with --resume, the\n"
                    "run's own config.yaml comes right after default.yaml). One run writes to a run folder at a\n"
                    "time (a second is refused, naming the holder); a new run refuses a folder holding another\n"
                    "run's checkpoints or log.jsonl (--resume auto continues it, --overwrite replaces it).\n\n"
                    "Launch: `fastdino train ...` is one process (CPU or one GPU). Several ranks take rank and world\n"
                    "size from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT):\n"
                    "  torchrun --nproc_per_node N -m fastdino train --config FILE\n"
                    "  torchrun --nnodes M --node_rank I --nproc_per_node N --master_addr HOST --master_port PORT \\\n"
                    "      -m fastdino train --config FILE       (on every node; or --rdzv_backend c10d\n"
                    "      --rdzv_endpoint HOST:PORT --rdzv_id JOB)\n"
                    "  deepspeed --num_gpus N --module fastdino train --config FILE\n"
                    "  deepspeed --hostfile configs/launch/hostfile --module fastdino train --config FILE\n"
                    "  sbatch configs/launch/slurm.sbatch        (srun + torchrun, rendezvous from SLURM)\n"
                    "On CPU the ranks talk over gloo (set DS_ACCELERATOR=cpu for the deepspeed launcher), on GPUs\n"
                    "over nccl. parallel.zero_stage=0|1|2 picks plain data parallel or DeepSpeed ZeRO 1/2;\n"
                    "data.batch_size is per rank. All ranks must see output_dir (a shared file system).")
    train.add_argument("--config", help="experiment YAML (only the keys that differ from default.yaml)")
    train.add_argument("--resume", metavar="CHECKPOINT|auto",
                       help="continue from a checkpoint (a step file, or a DeepSpeed step folder), or the newest "
                            "complete one in output_dir/checkpoints (auto; none: start from scratch, with a "
                            "warning); same world size and ZeRO stage. The run's own config.yaml is read first, "
                            "so `--resume auto output_dir=RUN` needs nothing else; --config and key=value go on "
                            "top, and keys that shape the model, optimizer, schedules or data order cannot change")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in output_dir: delete its checkpoints and log.jsonl once "
                            "this run is set up (without it, a folder holding a run is refused)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.001 data.batch_size=32")
    train.set_defaults(func=_train)

    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True,
                                                                              metavar="SUBCOMMAND")
    convert = data.add_parser("convert", help="write an image folder to an FFCV .beton file",
                              description="Class sub-folders become labels (a flat folder gets -1). Unreadable "
                                          "files are skipped and listed in OUT.beton.report.json.")
    convert.add_argument("src", help="image folder, or a text file of 'PATH [LABEL]' lines")
    convert.add_argument("out", help="output .beton path")
    convert.add_argument("--max-resolution", type=int, default=512, help="cap on the longer side (default 512)")
    convert.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    convert.add_argument("--storage", choices=["jpg", "raw"], default="jpg",
                         help="store JPEG (default; what the GPU decoder reads) or raw pixels (no decode, larger)")
    convert.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel workers")
    convert.set_defaults(func=_convert)

    evaluate = commands.add_parser("eval", help="evaluate features").add_subparsers(dest="eval_command", required=True,
                                                                                   metavar="SUBCOMMAND")
    knn = evaluate.add_parser("knn", help="weighted k-NN on frozen backbone features (official eval_knn)")
    _add_weights_arguments(knn)
    knn.add_argument("--train", required=True, help="labelled .beton for the memory bank")
    knn.add_argument("--val", required=True, help="labelled .beton to classify")
    knn.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours (default 10 20 100 200)")
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--drop-high-variance", type=int, default=0, metavar="N",
                     help="drop the N feature dimensions of highest variance over the train set before the "
                          "search (default 0: keep all)")
    knn.add_argument("--size", type=int, default=0,
                     help="evaluation image size (default: the run's eval.eval_size, else the model's img_size)")
    knn.add_argument("--batch-size", type=int, default=128)
    knn.add_argument("--device", choices=["auto", "cpu"], default="auto")
    knn.add_argument("--json", help="also write the results to this JSON file")
    knn.set_defaults(func=_eval_knn)

    linear = evaluate.add_parser(
        "linear", help="linear probe on frozen backbone features (official eval_linear)",
        description="Official recipe on features extracted once and cached: CLS tokens of the last N blocks "
                    "(+ mean patch token with --avgpool) -> Linear, SGD momentum 0.9, no weight decay, "
                    "lr = LR * batch / 256 with a cosine decay. Unlike official, no RandomResizedCrop/flip "
                    "augmentation while training the probe (centre crops only, for speed), and the last "
                    "epoch's accuracy is reported, not the best.")
    _add_weights_arguments(linear)
    linear.add_argument("--train", required=True, help="labelled .beton to train the probe on")
    linear.add_argument("--val", required=True, help="labelled .beton to score")
    linear.add_argument("--epochs", type=int, default=100, help="probe epochs over the cached features (default 100)")
    linear.add_argument("--lr", type=float, default=0.1,
                        help="lr per 256 images (default 0.1; the official 0.001 is tuned for ImageNet's >100k "
                             "steps and underfits small sets)")
    linear.add_argument("--batch-size", type=int, default=256, help="probe and feature-extraction batch (default 256)")
    linear.add_argument("--n-last-blocks", type=int, default=0,
                        help="concatenate the CLS tokens of this many last blocks (default: 4 for vit_tiny/small, "
                             "1 for vit_base)")
    linear.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None,
                        help="also append the last block's mean patch token (default: on for vit_base only)")
    linear.add_argument("--seed", type=int, default=0, help="seeds the probe's init and sample order")
    linear.add_argument("--size", type=int, default=0,
                        help="evaluation image size (default: the run's eval.eval_size, else the model's img_size)")
    linear.add_argument("--device", choices=["auto", "cpu"], default="auto")
    linear.add_argument("--json", help="also write the results to this JSON file")
    linear.set_defaults(func=_eval_linear)

    plot = commands.add_parser("plot", help="draw a run's training curves from its log.jsonl as one PNG",
                               description="Loss (with ln K), lr, weight decay, EMA momentum, teacher temperature, "
                                           "img/s, teacher/student entropy vs ln K and k-NN accuracy over steps.")
    plot.add_argument("run_dir", help="run folder (holds log.jsonl)")
    plot.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    plot.set_defaults(func=_plot)

    export = commands.add_parser(
        "export", help="write a backbone as official DINO, timm, safetensors or Hugging Face weights",
        description="official (.pth): the plain VisionTransformer state_dict of the released dino_*_pretrain.pth "
                    "files (with --with-head: {WHICH: {backbone.*, head.*}}); timm (.safetensors): the same names "
                    "(timm kept DINO's) in timm's safetensors container, with the timm.create_model arguments in its "
                    "metadata; safetensors (.safetensors): with arch, patch_size, embed_dim, depth, num_heads, "
                    "img_size and source step in its metadata; hf (a folder): config.json + model.safetensors for "
                    "transformers.ViTModel.from_pretrained(OUT, add_pooling_layer=False).")
    _add_weights_arguments(export)
    export.add_argument("--format", required=True, choices=["official", "timm", "safetensors", "hf"])
    export.add_argument("--out", required=True,
                        help="output file, or folder for hf (written under a temporary name, then renamed); a name "
                             "without an extension gets the format's")
    export.add_argument("--with-head", action="store_true",
                        help="also write the DINO projection head (official and safetensors only)")
    export.set_defaults(func=_export)

    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True,
                                                                          metavar="SUBCOMMAND")
    for name, summary in BENCH_SCRIPTS.items():
        script = bench.add_parser(name, help=summary, add_help=False,
                                  description=f"Runs bench/bench_{name}.py; later arguments go to it (--help).")
        script.add_argument("bench_args", nargs=argparse.REMAINDER, help=f"arguments of bench/bench_{name}.py")

    viz = commands.add_parser("viz", help="pictures").add_subparsers(dest="viz_command", required=True,
                                                                     metavar="SUBCOMMAND")
    attention = viz.add_parser("attention", help="per-head CLS attention maps of the last block as PNG")
    _add_weights_arguments(attention)
    attention.add_argument("images", nargs="+",
                           help="image files (8-bit, 16-bit and 32-bit images are scaled to 8 bits as "
                                "`data convert` does)")
    attention.add_argument("--out", default="attention", help="output folder (default ./attention)")
    attention.add_argument("--size", type=int, default=224, help="resize the shorter side to this (default 224)")
    attention.set_defaults(func=_viz_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCH_SCRIPTS:  # later arguments belong to the script
        args = argparse.Namespace(func=_bench_script, bench_name=argv[1], bench_args=argv[2:])
    else:
        args = build_parser().parse_args(argv)
    if os.environ.get("FASTDINO_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    # `exit_status` (training stopped by SIGINT/SIGTERM) is the shell's 128 + signal number, so that
    # schedulers and scripts see an interruption (130, 143) rather than a failure.
    except KeyboardInterrupt as exc:
        print(f"fastdino: interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
        return getattr(exc, "exit_status", 130)
    except Exception as exc:  # one clear line for the user; FASTDINO_DEBUG=1 shows the traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastdino: error: {message}", file=sys.stderr)
        return getattr(exc, "exit_status", 1)
