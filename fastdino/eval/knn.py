"""Weighted k-NN evaluation of frozen features, as official DINO `eval_knn.py`.

Each test image takes its k most cosine-similar training images; neighbour j votes
for its label with weight exp(sim_j / T) and the classes are ranked by summed votes.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode (no dropout / drop path), then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def extract_features(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed `(images [B, 3, H, W], labels [B])` batches with `model` in eval mode.

    Returns fp32 L2-normalised features `[N, D]` and long labels `[N]`, both on `device`.
    """
    features, labels = [], []
    with eval_mode(model):
        for images, batch_labels in batches:
            embedding = model(images.to(device, non_blocking=True)).float()
            features.append(F.normalize(embedding, dim=1))
            labels.append(torch.as_tensor(batch_labels).to(device, torch.long))
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024,
                 ks: Sequence[int] | None = None) -> dict:
    """Weighted k-NN accuracy in percent: `{"top1": ..., "top5": ...}`.

    Features must be L2-normalised (as `extract_features` returns them). k is clipped to
    the training-set size; "top5" is only reported with at least 5 classes and, as
    official, counts the target among the first min(5, k) ranked classes. With
    `ks=(10, 20, 100, 200)` every k is scored from one neighbour search and the result
    is `{k: {"top1": ..., "top5": ...}}`. Raises ValueError for unlabelled images (label -1).
    """
    if min(train_labels.min(), test_labels.min()) < 0:
        raise ValueError("k-NN needs labelled images, got label -1 (convert a folder of class sub-folders)")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    requested = tuple(ks) if ks is not None else (k,)
    clipped = {kk: min(kk, len(train_labels)) for kk in requested}
    max_k = max(clipped.values())
    top1 = dict.fromkeys(requested, 0)
    top5 = dict.fromkeys(requested, 0)
    for start in range(0, len(test_labels), chunk_size):
        targets = test_labels[start:start + chunk_size].view(-1, 1)
        similarity = test_features[start:start + chunk_size] @ train_features.T
        # Sorted, so the first k columns are the k nearest for every smaller k too.
        neighbour_sims, neighbour_idx = similarity.topk(max_k, dim=1)
        neighbour_labels = train_labels[neighbour_idx]
        vote_weights = (neighbour_sims / temperature).exp()
        for kk in requested:
            n = clipped[kk]
            votes = torch.zeros(len(targets), num_classes, device=vote_weights.device, dtype=vote_weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :n], vote_weights[:, :n])
            ranked_votes, ranked = votes.topk(min(5, n, num_classes), dim=1)
            # A class no neighbour voted for is no prediction (official would count an arbitrary tie).
            hits = (ranked == targets) & (ranked_votes > 0)
            top1[kk] += hits[:, 0].sum().item()
            top5[kk] += hits.any(dim=1).sum().item()
    total = len(test_labels)
    results = {}
    for kk in requested:
        results[kk] = {"top1": 100.0 * top1[kk] / total}
        if num_classes >= 5:
            results[kk]["top5"] = 100.0 * top5[kk] / total
    return results if ks is not None else results[k]


def drop_high_variance_dimensions(train_features: torch.Tensor, test_features: torch.Tensor,
                                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Removes the `n` feature dimensions that vary most over the training set, from both sets,
    then L2-normalises again.

    ViT features often carry a few outlier dimensions with far more variance than the rest;
    they then dominate every cosine similarity, and dropping them can make k-NN neighbours
    reflect the remaining, more semantic dimensions.
    """
    keep = low_variance_dimensions(train_features, n)
    return F.normalize(train_features[:, keep], dim=1), F.normalize(test_features[:, keep], dim=1)


def low_variance_dimensions(features: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (ascending, long) of the dimensions of `features` `[N, D]` left once the `n` of
    highest variance over its rows are dropped: `D - n` of them. Raises ValueError unless
    0 <= n < D."""
    if not 0 <= n < features.shape[1]:
        raise ValueError(f"cannot drop {n} of {features.shape[1]} feature dimensions")
    return features.var(dim=0).argsort(descending=True)[n:].sort().values


@torch.no_grad()
def all_gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Concatenates each rank's rows (in rank order) on every rank; ranks may hold different
    row counts. Returns the inputs unchanged outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    gathered = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)]))
    return tuple(gathered)


@torch.no_grad()
def knn_accuracy(backbone: nn.Module, train_beton: str, val_beton: str, *, size: int, batch_size: int,
                 device: torch.device | str, ks: Sequence[int] = (20,), temperature: float = 0.07,
                 drop_high_variance: int = 0, rank: int = 0, world_size: int = 1) -> dict:
    """The official k-NN evaluation of `backbone` (CLS embeddings of `size`-px centre crops): the
    labelled `train_beton` is the memory, `val_beton` is classified. Under torch.distributed each
    rank embeds its shard and every rank gets all rows. Returns `{k: {"top1": %, "top5": %}}`
    for each k in `ks`, from one neighbour search. Raises what `eval_loader` raises for a bad
    file, ValueError for unlabelled images."""
    from fastdino.data import eval_loader

    def embed(beton: str):
        loader = eval_loader(beton, batch_size, size=size, device=str(device), rank=rank, world_size=world_size)
        return all_gather_rows(*extract_features(backbone, loader, device))

    (train_features, train_labels), (val_features, val_labels) = embed(train_beton), embed(val_beton)
    if drop_high_variance:
        train_features, val_features = drop_high_variance_dimensions(train_features, val_features,
                                                                     drop_high_variance)
    return knn_classify(train_features, train_labels, val_features, val_labels, temperature=temperature, ks=ks)


def build_parser():
    from fastdino.eval.command import add_run_arguments, add_weights_arguments, command_parser

    parser = command_parser("knn", "Weighted k-NN on frozen backbone features (official eval_knn): CLS embeddings of "
                                   "centre crops, cosine similarity, votes exp(sim / T). Runs on every rank under "
                                   "torchrun, each embedding its shard.")
    add_weights_arguments(parser)
    parser.add_argument("--train", required=True, help="labelled .beton for the memory bank")
    parser.add_argument("--val", required=True, help="labelled .beton to classify")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="neighbours (default 10 20 100 200)")
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--size", type=int, default=0,
                        help="evaluation image size (default: the run's eval.eval_size, else the model's img_size)")
    parser.add_argument("--batch-size", type=int, default=128)
    add_run_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`fastdino eval knn ...`: prints top-1 per k, writes --json (rank 0)."""
    import torch.distributed as dist

    from fastdino.eval.command import check_labelled_betons, eval_backbone, eval_device, write_json
    from fastdino.parallel.distributed import init_from_launcher

    args = build_parser().parse_args(argv)
    device = eval_device(args.device)
    rank, world_size = init_from_launcher(device)
    backbone, _, size = eval_backbone(args, device)
    check_labelled_betons(args.train, args.val)
    by_k = knn_accuracy(backbone, args.train, args.val, size=size, batch_size=args.batch_size, device=device,
                        ks=args.k, temperature=args.temperature, drop_high_variance=args.drop_high_variance,
                        rank=rank, world_size=world_size)
    results = {f"k={k}": by_k[k] for k in args.k}
    if rank == 0:
        for k in args.k:
            print(f"{args.which} k-NN k={k:<4d} top-1 {by_k[k]['top1']:.2f}%")
        write_json(args.json, results)
    if world_size > 1:
        dist.destroy_process_group()
    return 0
