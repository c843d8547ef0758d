"""Linear probe on frozen features, the official DINO `eval_linear.py` recipe.

Features: the CLS tokens of the last n blocks, concatenated (official ViT-S setting, n=4),
or with `avgpool` also the mean patch token of the last block (official ViT-B setting,
n=1). Classifier: one Linear layer (weights N(0, 0.01), bias 0) trained with cross-entropy,
SGD momentum 0.9, no weight decay, lr = base_lr * batch_size / 256 decayed to 0 by a cosine
stepped once per epoch (torch CosineAnnealingLR, as official).

Two deliberate differences, both for speed and simplicity:
  * The official probe trains on RandomResizedCrop + horizontal flip views, running the
    frozen backbone on every step. We embed centre crops once, cache the features in memory
    and train on those: a hundred epochs then cost seconds, not hours. Without augmentation
    the probe may overfit small sets sooner and score a little lower than official.
  * The official script reports the best validation accuracy over the epochs (chosen on the
    validation set); we report the last epoch's.
And one default: base lr 0.1 instead of the official 0.001. That one is tuned for ImageNet,
where 100 epochs are over 100k steps; on a set of a few thousand images the same 100 epochs
are a few hundred steps and the probe is left far from converged (on the demo's digits,
0.001 scores ~20 points below 0.1). Pass `lr=0.001` for the official setting.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastdino.eval.knn import eval_mode


def probe_defaults(arch: str) -> tuple[int, bool]:
    """(n_last_blocks, avgpool) of the official recipe: 4 CLS tokens for ViT-T/S, CLS + mean patch for ViT-B."""
    return (1, True) if arch == "vit_base" else (4, False)


@torch.no_grad()
def extract_probe_features(backbone: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           device: torch.device | str, n_last_blocks: int = 4,
                           avgpool: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features `[N, D * (min(n_last_blocks, depth) + avgpool)]` (fp32) and long labels `[N]`, on `device`.

    Unlike k-NN features these are not L2-normalised: the official probe sees raw tokens.
    """
    features, labels = [], []
    with eval_mode(backbone):
        for images, batch_labels in batches:
            blocks = backbone.get_intermediate_layers(images.to(device, non_blocking=True), n_last_blocks)
            parts = [tokens[:, 0] for tokens in blocks]
            if avgpool:
                parts.append(blocks[-1][:, 1:].mean(dim=1))
            # Official interleaves CLS and mean-patch channels; the order means nothing to a probe trained here.
            features.append(torch.cat(parts, dim=-1).float())
            labels.append(torch.as_tensor(batch_labels).to(device, torch.long))
    return torch.cat(features), torch.cat(labels)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 100,
                       lr: float = 0.1, batch_size: int = 256, seed: int = 0, progress: bool = False) -> nn.Linear:
    """Fits a Linear(D, num_classes) on cached features by the official recipe; `lr` is per 256 images."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"the linear probe needs epochs >= 1 and batch_size >= 1, got {epochs} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)  # on the CPU: it draws the init and every epoch's order
    classifier = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=generator)
        classifier.bias.zero_()
    classifier.to(features.device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0.0)
    bar = tqdm(range(epochs), desc="linear probe", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(len(labels), generator=generator).to(features.device)
        epoch_loss = torch.zeros((), device=features.device)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(features[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach() * len(batch)
        scheduler.step()
        if progress:
            bar.set_postfix(loss=f"{epoch_loss.item() / len(order):.4f}", refresh=False)
    return classifier.eval()


@torch.no_grad()
def evaluate_linear_probe(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 8192) -> dict:
    """Accuracy in percent: `{"top1": ...}`, plus "top5" when there are at least 5 classes."""
    num_classes = classifier.out_features
    hits = torch.zeros(2, device=features.device)
    for start in range(0, len(labels), chunk_size):
        targets = labels[start:start + chunk_size, None]
        ranked = classifier(features[start:start + chunk_size]).topk(min(5, num_classes), dim=1).indices
        hits[0] += (ranked[:, :1] == targets).sum()
        hits[1] += (ranked == targets).any(dim=1).sum()
    top1, top5 = (100.0 * hits / len(labels)).tolist()
    return {"top1": top1, "top5": top5} if num_classes >= 5 else {"top1": top1}


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, *, epochs: int = 100, lr: float = 0.1, batch_size: int = 256,
                 seed: int = 0, progress: bool = False) -> dict:
    """Trains on the train features, scores the validation features: top1/top5 on val, top-1 on train."""
    if len(train_labels) == 0 or len(val_labels) == 0:
        raise ValueError("the linear probe needs labelled train and validation images; one set is empty")
    if min(train_labels.min(), val_labels.min()) < 0:
        raise ValueError("the linear probe needs labelled images, got label -1 (convert a folder of class sub-folders)")
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    classifier = train_linear_probe(train_features, train_labels, num_classes, epochs=epochs, lr=lr,
                                    batch_size=batch_size, seed=seed, progress=progress)
    results = evaluate_linear_probe(classifier, val_features, val_labels)
    results["train_top1"] = evaluate_linear_probe(classifier, train_features, train_labels)["top1"]
    results.update(num_classes=num_classes, feature_dim=train_features.shape[1],
                   train_images=len(train_labels), val_images=len(val_labels))
    return results


def build_parser():
    import argparse

    from fastdino.eval.command import add_run_arguments, add_weights_arguments, command_parser

    parser = command_parser(
        "linear", "Linear probe on frozen backbone features (official eval_linear). Official recipe on features "
                  "extracted once and cached: CLS tokens of the last N blocks (+ mean patch token with --avgpool) "
                  "-> Linear, SGD momentum 0.9, no weight decay, lr = LR * batch / 256 with a cosine decay. Unlike "
                  "official, no RandomResizedCrop/flip augmentation while training the probe (centre crops only, "
                  "for speed), and the last epoch's accuracy is reported, not the best.")
    add_weights_arguments(parser)
    parser.add_argument("--train", required=True, help="labelled .beton to train the probe on")
    parser.add_argument("--val", required=True, help="labelled .beton to score")
    parser.add_argument("--epochs", type=int, default=100, help="probe epochs over the cached features (default 100)")
    parser.add_argument("--lr", type=float, default=0.1,
                        help="lr per 256 images (default 0.1; the official 0.001 is tuned for ImageNet's >100k "
                             "steps and underfits small sets)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="probe and feature-extraction batch (default 256)")
    parser.add_argument("--n-last-blocks", type=int, default=0,
                        help="concatenate the CLS tokens of this many last blocks (default: 4 for vit_tiny/small, "
                             "1 for vit_base)")
    parser.add_argument("--avgpool", action=argparse.BooleanOptionalAction, default=None,
                        help="also append the last block's mean patch token (default: on for vit_base only)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the probe's init and sample order")
    parser.add_argument("--size", type=int, default=0,
                        help="evaluation image size (default: the run's eval.eval_size, else the model's img_size)")
    add_run_arguments(parser, drop_high_variance=False)
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino eval linear ...`: prints top-1 (and top-5), writes --json."""
    from fastdino.data import eval_loader
    from fastdino.eval.command import check_labelled_betons, eval_backbone, eval_device, write_json

    args = build_parser().parse_args(argv)
    device = eval_device(args.device)
    backbone, arch, size = eval_backbone(args, device)
    check_labelled_betons(args.train, args.val)
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
    write_json(args.json, results)
    return 0
