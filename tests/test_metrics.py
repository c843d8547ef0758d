"""Analytic FLOPs against shared/DESIGN.md's performance table."""
import pytest

from fastdino import metrics

# DESIGN.md: global fwd, local fwd, per image (2 x 224 + 10 x 96, K = 65536), in GFLOP.
TABLE = {"vit_small": (9.1, 1.6, 122.0), "vit_base": (34.9, 6.3, 471.0)}


@pytest.mark.parametrize("arch", list(TABLE))
def test_flops_per_image_match_the_design_table(arch):
    global_fwd, local_fwd, per_image = TABLE[arch]
    # The table counts the transformer blocks (and the head in the total) but not the patch
    # embedding; fastdino counts the patch embedding too (a real matmul): add it to the table's values.
    width = metrics.ARCH_WIDTH[arch]
    embed = lambda size: 2 * (size // 16) ** 2 * 3 * 16**2 * width  # noqa: E731
    prototypes = metrics.vit_forward_flops(arch, 16, 224, 65536) - metrics.vit_forward_flops(arch, 16, 224, 0)
    assert prototypes == 2 * 256 * 65536  # the head's last layer: bottleneck 256 -> K
    blocks_global = metrics.vit_forward_flops(arch, 16, 224, 0) - embed(224) - 2 * (width * 2048 + 2048**2 + 2048 * 256)
    blocks_local = metrics.vit_forward_flops(arch, 16, 96, 0) - embed(96) - 2 * (width * 2048 + 2048**2 + 2048 * 256)
    assert blocks_global / 1e9 == pytest.approx(global_fwd, abs=0.05)
    assert blocks_local / 1e9 == pytest.approx(local_fwd, abs=0.05)
    total = metrics.dino_flops_per_image(arch, 16, 224, 96, 10, 65536)
    embed_total = 3 * (2 * embed(224) + 10 * embed(96)) + 2 * embed(224)
    assert (total - embed_total) / 1e9 == pytest.approx(per_image, abs=0.5)


def test_mfu_and_peak():
    assert metrics.peak_flops("cpu") is None and metrics.mfu(100.0, 1e9, None) is None
    # The target: 3,000 img/s at 122 GF per image is ~46% of 800 TFLOP/s.
    assert metrics.mfu(3000, 122e9, metrics.peak_flops("cuda")) == pytest.approx(0.4575)
