"""Throughput accounting: analytic FLOPs per image, img/s and MFU.

FLOPs count a multiply-add as 2. Per ViT block over N tokens of width D with MLP
ratio 4: 24*N*D^2 (qkv, projection, MLP) + 4*N^2*D (scores and weighted sum).
The student runs forward + backward (3x forward) over every crop; the teacher
runs forward over the 2 global crops. Each crop's forward also counts the patch
embedding and the DINO head (MLP and the K prototypes). shared/DESIGN.md's table leaves
the patch embedding out: with it, 2 x 224 + 10 x 96 at K = 65536 costs 123.8 GF per image
for ViT-S/16 (table: 122) and 474.1 GF for ViT-B/16 (table: 471); tests/test_metrics.py
checks both against the table.

These are the model's FLOPs, the same count for every implementation, so MFU compares like with
like: fastdino's class-token readout skips the last block's work at the other tokens, which
nothing reads (for ViT-S/16 at 2 x 224 + 10 x 96, 6.7 % of this count), and activation
checkpointing's recomputation is not counted either.
"""
from __future__ import annotations

# Dense bf16 matmul rate measured on an H100 (shared/DESIGN.md): the MFU denominator on CUDA.
H100_BF16_FLOPS = 800e12

ARCH_WIDTH = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}


def vit_forward_flops(arch: str, patch_size: int, image_size: int, out_dim: int, depth: int = 12,
                      head_hidden_dim: int = 2048, head_bottleneck_dim: int = 256, head_nlayers: int = 3) -> float:
    width = ARCH_WIDTH[arch]
    patches = (image_size // patch_size) ** 2
    tokens = patches + 1
    blocks = depth * (24 * tokens * width**2 + 4 * tokens**2 * width)
    patch_embed = 2 * patches * 3 * patch_size**2 * width
    dims = [width] + [head_hidden_dim] * (head_nlayers - 1) + [head_bottleneck_dim]
    head = 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:])) + 2 * head_bottleneck_dim * out_dim
    return float(blocks + patch_embed + head)


def dino_flops_per_image(arch: str, patch_size: int, global_size: int, local_size: int,
                         n_local_crops: int, out_dim: int, **head) -> float:
    global_fwd = vit_forward_flops(arch, patch_size, global_size, out_dim, **head)
    local_fwd = vit_forward_flops(arch, patch_size, local_size, out_dim, **head)
    student = 3 * (2 * global_fwd + n_local_crops * local_fwd)
    teacher = 2 * global_fwd
    return student + teacher


def flops_per_image_from_config(cfg) -> float:
    m, d = cfg.model, cfg.data
    return dino_flops_per_image(m.arch, m.patch_size, d.global_size, d.local_size, d.n_local_crops, m.out_dim,
                                depth=m.depth, head_hidden_dim=m.head_hidden_dim, head_bottleneck_dim=m.head_bottleneck_dim,
                                head_nlayers=m.head_nlayers)


def peak_flops(device_type: str) -> float | None:
    """The MFU denominator; None where no measured peak is known (CPUs)."""
    return H100_BF16_FLOPS if device_type == "cuda" else None


def mfu(images_per_second: float, flops_per_image: float, peak: float | None) -> float | None:
    return images_per_second * flops_per_image / peak if peak else None
