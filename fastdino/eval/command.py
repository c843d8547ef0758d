"""What every `fastdino eval|viz|export` command shares: the weights arguments, the device, the
backbone read from any checkpoint kind, the JSON result.

Each evaluation module (`fastdino/eval/<name>.py`) owns its command: `build_parser()` and
`main(argv) -> int`; `fastdino/cli.py` only routes `fastdino eval <name> ...` to it. Errors are
raised as exceptions with a one-line message; the CLI prints that line and exits non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ARCHS = ["vit_tiny", "vit_small", "vit_base"]


def command_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `fastdino eval NAME` (its --help shows that name)."""
    return argparse.ArgumentParser(prog=f"fastdino eval {name}", description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """CHECKPOINT and how to read it, for the commands that take any backbone weights file."""
    parser.add_argument("checkpoint", help="fastdino training checkpoint (.pt, a DeepSpeed step folder, or a run "
                                           "folder: its newest checkpoint), official DINO weights (backbone-only "
                                           "or full checkpoint), a `fastdino export` file or Hugging Face folder, "
                                           "timm-layout or safetensors file")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher",
                        help="network of a training checkpoint (default teacher)")
    parser.add_argument("--arch", choices=ARCHS,
                        help="architecture (default: what the file records, else what its tensor shapes show)")
    parser.add_argument("--patch-size", type=int,
                        help="patch size (default: what the file records, else what its tensor shapes show)")


def add_run_arguments(parser: argparse.ArgumentParser, *, drop_high_variance: bool = True) -> None:
    """--device, --json and (where features are compared by distance) --drop-high-variance."""
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: the GPU where there is one (default), else the CPU")
    parser.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    if drop_high_variance:
        parser.add_argument("--drop-high-variance", type=int, default=0, metavar="N",
                            help="drop the N feature dimensions of highest variance (over the reference/memory "
                                 "features) before comparing features (default 0: keep all)")


def eval_device(choice: str = "auto"):
    """torch.device for --device auto|cpu: CUDA (this rank's LOCAL_RANK under a launcher) where
    there is a GPU, else the CPU (fastdino.runinfo.resolve_device)."""
    from fastdino.parallel.distributed import launcher_env
    from fastdino.runinfo import resolve_device

    return resolve_device(choice, launcher_env().local_rank)


def read_backbone(args: argparse.Namespace, device):
    """(backbone in eval mode on `device`, the weights read) from `args.checkpoint`, any kind
    `fastdino.eval.export.read_backbone` reads; a folder's chosen file is named on stderr.
    Raises fastdino.train.checkpoint.CheckpointError (one line) when it cannot be read."""
    from fastdino.eval.export import read_backbone as read

    backbone, weights = read(args.checkpoint, args.which, args.arch, args.patch_size)
    if Path(args.checkpoint).is_dir():
        print(f"reading {weights.source}", file=sys.stderr)
    return backbone.to(device).eval(), weights


def eval_backbone(args: argparse.Namespace, device):
    """(backbone on `device`, its arch, the image size to evaluate at): `args.size` when given
    (and non-zero), else the run's eval size for training checkpoints, else the model's img_size."""
    backbone, weights = read_backbone(args, device)
    size = getattr(args, "size", 0) or weights.eval_size or backbone.patch_embed.img_size
    return backbone, args.arch or weights.arch, size


def check_labelled_betons(train: str, val: str) -> None:
    """--train and --val must be labelled .beton files; checked before any image is decoded.
    Raises fastdino.data.decode.DataError (one line) naming the flag."""
    from fastdino.data.decode import check_beton

    check_beton(train, source="--train", need_labels=True)
    check_beton(val, source="--val", need_labels=True)


def write_json(path: str | os.PathLike | None, results: dict) -> None:
    """Writes `results` (strict JSON, indented) to `path` when one was given, atomically."""
    if not path:
        return
    from fastdino.train.checkpoint import atomic_write_bytes

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), (json.dumps(results, indent=2, allow_nan=False) + "\n").encode())


def save_figure(figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Writes a matplotlib Figure as a PNG at `path` (parents created), atomically: a kill never
    leaves half a picture. Returns the path."""
    import io

    from fastdino.train.checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path
