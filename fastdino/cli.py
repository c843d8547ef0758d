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


def _train(args) -> int:
    from fastdino.config import load_config
    from fastdino.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    summary = Trainer(cfg, resume=args.resume).train()
    print(json.dumps({"output_dir": cfg.output_dir, "steps": summary["steps"],
                      "final_loss": summary["last"].get("loss"), "final_knn": summary["final_knn"]}))
    return 0


def _convert(args) -> int:
    from fastdino.data import convert_folder

    report = convert_folder(args.src, args.out, max_resolution=args.max_resolution,
                            jpeg_quality=args.jpeg_quality, num_workers=args.workers)
    print(f"wrote {report['written']} images to {args.out}; skipped {len(report['skipped'])} "
          f"(see {args.out}.report.json)")
    return 0


def _eval_knn(args) -> int:
    import torch

    from fastdino.data import eval_loader
    from fastdino.eval.knn import extract_features, knn_classify
    from fastdino.train.checkpoint import load_backbone

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    backbone, cfg = load_backbone(args.checkpoint, args.which)
    backbone.to(device)
    size = args.size or cfg.eval.eval_size
    train = extract_features(backbone, eval_loader(args.train, args.batch_size, size=size, device=str(device)), device)
    val = extract_features(backbone, eval_loader(args.val, args.batch_size, size=size, device=str(device)), device)
    results = {}
    for k in args.k:
        results[f"k={k}"] = knn_classify(train[0], train[1], val[0], val[1], k=k, temperature=args.temperature)
        print(f"{args.which} k-NN k={k:<4d} top-1 {results[f'k={k}']['top1']:.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _viz_attention(args) -> int:
    from fastdino.eval.draw import draw_attention_for_files
    from fastdino.train.checkpoint import load_backbone

    backbone, cfg = load_backbone(args.checkpoint, args.which)
    paths = draw_attention_for_files(backbone, cfg.model.patch_size, args.images, Path(args.out), size=args.size)
    for path in paths:
        print(path)
    return 0


def _demo(args) -> int:
    from fastdino.demo import run_demo

    summary = run_demo(Path(args.output_dir), overrides=args.overrides)
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdino", description="Fast DINO self-supervised ViT training.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a tiny ViT on scikit-learn's digits on CPU, end to end",
                               description="Converts digits to .beton, trains DINO, reports k-NN before/after "
                                           "and draws attention maps into OUTPUT_DIR (runs/demo).")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides on top of configs/demo.yaml")
    demo.set_defaults(func=_demo)

    train = commands.add_parser("train", help="train DINO from a config file",
                                description="Loads configs/default.yaml, then --config, then key=value overrides.")
    train.add_argument("--config", help="experiment YAML (only the keys that differ from default.yaml)")
    train.add_argument("--resume", metavar="CHECKPOINT|auto",
                       help="continue from a checkpoint file, or the newest one in output_dir (auto)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.001 data.batch_size=32")
    train.set_defaults(func=_train)

    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True,
                                                                              metavar="SUBCOMMAND")
    convert = data.add_parser("convert", help="write an image folder to an FFCV .beton file",
                              description="Class sub-folders become labels (a flat folder gets -1). Unreadable "
                                          "files are skipped and listed in OUT.beton.report.json.")
    convert.add_argument("src", help="image folder")
    convert.add_argument("out", help="output .beton path")
    convert.add_argument("--max-resolution", type=int, default=512, help="cap on the longer side (default 512)")
    convert.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality (default 90)")
    convert.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="parallel workers")
    convert.set_defaults(func=_convert)

    evaluate = commands.add_parser("eval", help="evaluate features").add_subparsers(dest="eval_command", required=True,
                                                                                   metavar="SUBCOMMAND")
    knn = evaluate.add_parser("knn", help="weighted k-NN on frozen backbone features (official eval_knn)")
    knn.add_argument("checkpoint", help="training checkpoint (.pt)")
    knn.add_argument("--train", required=True, help="labelled .beton for the memory bank")
    knn.add_argument("--val", required=True, help="labelled .beton to classify")
    knn.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours (default 10 20 100 200)")
    knn.add_argument("--temperature", type=float, default=0.07)
    knn.add_argument("--which", choices=["teacher", "student"], default="teacher")
    knn.add_argument("--size", type=int, default=0, help="evaluation image size (default: the run's eval.eval_size)")
    knn.add_argument("--batch-size", type=int, default=128)
    knn.add_argument("--device", choices=["auto", "cpu"], default="auto")
    knn.add_argument("--json", help="also write the results to this JSON file")
    knn.set_defaults(func=_eval_knn)

    viz = commands.add_parser("viz", help="pictures").add_subparsers(dest="viz_command", required=True,
                                                                     metavar="SUBCOMMAND")
    attention = viz.add_parser("attention", help="per-head CLS attention maps of the last block as PNG")
    attention.add_argument("checkpoint", help="training checkpoint (.pt)")
    attention.add_argument("images", nargs="+", help="image files")
    attention.add_argument("--out", default="attention", help="output folder (default ./attention)")
    attention.add_argument("--size", type=int, default=224, help="resize the shorter side to this (default 224)")
    attention.add_argument("--which", choices=["teacher", "student"], default="teacher")
    attention.set_defaults(func=_viz_attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("FASTDINO_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("fastdino: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line for the user; FASTDINO_DEBUG=1 shows the traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fastdino: error: {message}", file=sys.stderr)
        return 1
