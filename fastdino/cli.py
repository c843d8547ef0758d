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

# OpenMP reads its wait policy once, when torch loads, so it is chosen per command before any
# import of torch. Where FFCV's decode threads run beside torch's CPU ops (training and the demo
# read .beton files, convert writes them, the loader benchmark), idle OpenMP threads must sleep at
# once (PASSIVE): spinning, they take the cores the decoders need. Everywhere else (the step
# benchmark, evaluation, export) libgomp's default (spin a little, then sleep) is kept: waking
# sleeping threads for every small op halves the speed of small CPU steps. A policy set in the
# environment always wins; runs and benchmarks record the one in force.
PASSIVE_WAIT_COMMANDS = (("train",), ("demo",), ("data", "convert"), ("bench", "loader"))


def choose_omp_wait_policy(argv: list[str]) -> None:
    if any(tuple(argv[:len(command)]) == command for command in PASSIVE_WAIT_COMMANDS):
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
                            jpeg_quality=args.jpeg_quality, storage=args.storage, num_workers=args.workers,
                            labels=args.labels)
    classes = f" in {len(report['classes'])} classes" if report["classes"] else ""
    loose = sum(entry["reason"].startswith("outside the class folders") for entry in report["skipped"])
    hint = f"; {loose} of them lie outside the class folders: --labels none keeps them" if loose else ""
    print(f"wrote {report['written']} images{classes} to {args.out}; skipped {len(report['skipped'])} "
          f"(see {args.out}.report.json){hint}")
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


def _viz_attention(args) -> int:
    from fastdino.eval.draw import draw_attention_for_files

    from fastdino.eval.command import read_backbone

    backbone, _ = read_backbone(args, "cpu")
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


def _module_command(args) -> int:
    """Runs the `main(argv)` of the module that owns the command (see fastdino/eval/command.py)."""
    import importlib

    return importlib.import_module(args.module).main(args.module_args)


# Commands whose module owns its parser: `fastdino eval NAME ...` -> MODULE.main([...]).
EVAL_COMMANDS = {
    "knn": ("fastdino.eval.knn", "weighted k-NN on frozen backbone features (official eval_knn)"),
    "linear": ("fastdino.eval.linear", "linear probe on frozen backbone features (official eval_linear)"),
    "segment": ("fastdino.eval.segment",
                "few-shot semantic segmentation by patch-feature nearest neighbours: mean IoU"),
    "attention-masks": ("fastdino.eval.attention_masks",
                        "Jaccard of the last block's thresholded CLS attention with foreground masks"),
    "video": ("fastdino.eval.video",
              "video object segmentation by patch-feature label propagation (DAVIS-2017): J&F"),
    "retrieval": ("fastdino.eval.retrieval",
                  "image retrieval by CLS cosine similarity (revisited Oxford/Paris, instance folders): mAP"),
}
DATA_COMMANDS = {
    "scenes": ("fastdino.data.scenes",
               "write generated scenes with exact masks, videos and instances in the VOC, DAVIS and "
               "Oxford layouts, to try every evaluation without downloading anything"),
}

BENCH_SCRIPTS = {
    "kernels": "time the Triton loss and EMA kernels against their baselines and the bandwidth floor",
    "loader": "multi-crop loading img/s and CPU cores: the official PIL recipe against fastdino's loader",
    "memory": "parameter, gradient and optimizer-state bytes per rank under ZeRO 0/1/2 (analytic; --measure runs DeepSpeed)",
    "train": "end-to-end training step img/s, MFU, memory and breakdown: fastdino against the official step",
}


def build_parser() -> argparse.ArgumentParser:
    from fastdino.eval.command import add_weights_arguments

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
        description="Starts from the defaults (fastdino/config.py; configs/default.yaml lists them), then --config,\n"
                    "then key=value overrides (with --resume, the run's own config.yaml comes right after the\n"
                    "defaults). One run writes to a run folder at a time (a second is refused, naming the holder);\n"
                    "a new run refuses a folder holding another\n"
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
    train.add_argument("--config", help="experiment YAML (only the keys that differ from the defaults), or a "
                                        "shipped one by name: demo, laptop, vit_small_16, vit_base_16")
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
                              description="Class sub-folders become labels (a flat folder gets -1; --labels none: "
                                          "every image below the folder, label -1). Unreadable files are skipped "
                                          "and listed in OUT.beton.report.json.")
    convert.add_argument("src", help="image folder, or a text file of 'PATH [LABEL]' lines")
    convert.add_argument("out", help="output .beton path")
    convert.add_argument("--max-resolution", type=int, default=512, help="cap on the longer side (default 512)")
    convert.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    convert.add_argument("--storage", choices=["jpg", "raw"], default="jpg",
                         help="store JPEG (default; what the GPU decoder reads) or raw pixels (no decode, larger)")
    convert.add_argument("--labels", choices=["folders", "none"], default="folders",
                         help="folders: class sub-folders give the labels (default); none: keep every image below "
                              "SRC, sub-folders or not, without labels (a photo library)")
    convert.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel workers")
    convert.set_defaults(func=_convert)
    for name, (module, summary) in DATA_COMMANDS.items():
        command = data.add_parser(name, help=summary, add_help=False,
                                  description=f"Runs {module}; later arguments go to it (--help).")
        command.add_argument("data_args", nargs=argparse.REMAINDER, help="arguments of the command (--help)")

    evaluate = commands.add_parser("eval", help="evaluate features").add_subparsers(dest="eval_command", required=True,
                                                                                   metavar="SUBCOMMAND")
    for name, (module, summary) in EVAL_COMMANDS.items():
        command = evaluate.add_parser(name, help=summary, add_help=False,
                                      description=f"Runs {module}; later arguments go to it (--help).")
        command.add_argument("eval_args", nargs=argparse.REMAINDER, help="arguments of the command (--help)")

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
    add_weights_arguments(export)
    export.add_argument("--format", required=True, choices=["official", "timm", "safetensors", "hf"])
    export.add_argument("--out", required=True,
                        help="output file, or folder for hf (written under a temporary name, then renamed); a name "
                             "without an extension gets the format's. An existing folder (not for hf) gets the "
                             "file inside it: WHICH_backbone.pth (official), WHICH_backbone_timm.safetensors "
                             "(timm) or WHICH_backbone.safetensors (safetensors), with _with_head before the "
                             "extension for --with-head")
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
    add_weights_arguments(attention)
    attention.add_argument("images", nargs="+",
                           help="image files (8-bit, 16-bit and 32-bit images are scaled to 8 bits as "
                                "`data convert` does)")
    attention.add_argument("--out", default="attention", help="output folder (default ./attention)")
    attention.add_argument("--size", type=int, default=224, help="resize the shorter side to this (default 224)")
    attention.set_defaults(func=_viz_attention)
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command and its arguments; building the parser imports torch (fastdino.eval)."""
    if argv[:1] == ["bench"] and argv[1:2] and argv[1] in BENCH_SCRIPTS:  # later arguments belong to the script
        return argparse.Namespace(func=_bench_script, bench_name=argv[1], bench_args=argv[2:])
    if argv[:1] == ["eval"] and argv[1:2] and argv[1] in EVAL_COMMANDS:
        return argparse.Namespace(func=_module_command, module=EVAL_COMMANDS[argv[1]][0], module_args=argv[2:])
    if argv[:1] == ["data"] and argv[1:2] and argv[1] in DATA_COMMANDS:
        return argparse.Namespace(func=_module_command, module=DATA_COMMANDS[argv[1]][0], module_args=argv[2:])
    return build_parser().parse_args(argv)


def _close_progress_bars() -> None:
    """Closes the tqdm bars a failed command left open (the traceback keeps them alive), innermost
    first, so that the one-line message after them starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:  # nothing imported it: no bar was drawn
        return
    # A bar interrupted while it was being made has no position yet; close() skips it.
    for bar in sorted(tqdm.tqdm._instances, key=lambda bar: abs(getattr(bar, "pos", 0)), reverse=True):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    """Runs the `fastdino` command `argv` (default: sys.argv[1:]) and returns its exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The deepspeed launcher puts --local_rank=N before the command; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    choose_omp_wait_policy(argv)
    debug = os.environ.get("FASTDINO_DEBUG") == "1"
    # Parsing is inside the try: the heavy imports (torch, matplotlib) take seconds, and a Ctrl-C
    # during them is an interruption like any later one, not a traceback.
    try:
        args = _parse(argv)
        return args.func(args)
    # `exit_status` (training stopped by SIGINT/SIGTERM) is the shell's 128 + signal number, so that
    # schedulers and scripts see an interruption (130, 143) rather than a failure.
    except KeyboardInterrupt as exc:
        if debug:
            raise
        _close_progress_bars()
        print(f"fastdino: stopped: {exc if str(exc) else 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_status", 130)
    except Exception as exc:  # one clear line for the user; FASTDINO_DEBUG=1 shows the traceback
        if debug:
            raise
        _close_progress_bars()
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A run stopped by a signal after saving (exit status 130/143) did what was asked: no "error".
        trainer = sys.modules.get("fastdino.train.trainer")
        stopped = trainer is not None and isinstance(exc, trainer.TrainingInterrupted)
        print(f"fastdino: {'stopped' if stopped else 'error'}: {message}", file=sys.stderr)
        return getattr(exc, "exit_status", 1)
