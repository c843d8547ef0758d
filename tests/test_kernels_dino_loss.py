"""Triton DINO loss kernels against the PyTorch reference (and the reference against the
official pair-by-pair arithmetic).

The kernels run on CUDA tensors when a GPU is present and on CPU tensors through the Triton
interpreter otherwise. Triton picks interpreter mode when a function is decorated, and
`triton.language` decorates its own functions at its first import, so on a machine without a
GPU this module imports the kernels with TRITON_INTERPRET=1 (then restores the environment, so
that other modules' dispatch is unaffected). If another test module imported triton first, the
CPU cases skip and one test re-runs this file in a fresh interpreter process instead.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from kernel_subprocess import (REPO_ROOT, assert_compiles_for_h100, assert_passes_under_interpreter,
                               import_kernel_module, kernel_devices)

dl = import_kernel_module("dino_loss")
DinoLossConfig = dl.DinoLossConfig
ON_CPU, ON_CUDA, DEVICES = kernel_devices(dl._dino_loss_fwd_kernel)
STUDENT_TEMP = 0.1
GRAD_OUT = 1.7  # upstream gradient: the kernel must read it, not assume 1


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while it runs a kernel."""
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(batch, n_crops, n_teacher, K, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n_crops * batch, K, generator=gen) * 2 * scale
    teacher = torch.randn(n_teacher * batch, K, generator=gen) * scale
    center = torch.randn(K, generator=gen) * 0.3 * scale
    return student.to(device, dtype), teacher.to(device, dtype), center.to(device)


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every torch.empty/empty_like during the test starts as NaN: unwritten output shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(x):
        return x.fill_(float("nan") if x.is_floating_point() else -1)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def kernel_and_reference(student, teacher, center, n_teacher, config, teacher_temp=0.04):
    """((loss, grad, teacher_sum) of the kernel, same of the fp32 reference on the upcast inputs)."""
    s = student.clone().requires_grad_()
    loss, teacher_sum = dl.dino_loss(s, teacher, center, STUDENT_TEMP, teacher_temp, n_teacher_views=n_teacher,
                                     config=config)
    (loss * GRAD_OUT).backward()
    s_ref = student.float().clone().requires_grad_()
    loss_ref, teacher_sum_ref = dl.dino_loss_reference(s_ref, teacher.float(), center, STUDENT_TEMP, teacher_temp,
                                                       n_teacher_views=n_teacher)
    (loss_ref * GRAD_OUT).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert teacher_sum.dtype == torch.float32 and teacher_sum.shape == (student.shape[1],)
    assert s.grad.dtype == student.dtype and s.grad.shape == student.shape
    for x in (loss, s.grad, teacher_sum):
        assert torch.isfinite(x).all()
    return (loss, s.grad, teacher_sum), (loss_ref, s_ref.grad, teacher_sum_ref)


def assert_matches(ours, ref, tol):
    for name, a, b in zip(("loss", "grad", "teacher_sum"), ours, ref):
        assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.3g} >= {tol}"


def small_config(images, lanes, vec, chunk_tiles, groups):
    """A forward launch shape for the interpreter (backward: 64-column tiles, 3 per program)."""
    return DinoLossConfig(fwd_images=images, fwd_lanes=lanes, fwd_vec=vec, fwd_chunk_tiles=chunk_tiles,
                          fwd_groups=groups, block_k=64, bwd_chunk_tiles=3)


# (batch, n_crops, n_teacher, K, dtype, config): odd K with masked tails and full tiles
# (K a multiple of the tile and the batch of the image sets: no masks), 2+0 / 2+3 / 2+8 / 2+10
# crops (V not a power of two), one or two teacher views; small configs force several chunks,
# groups, image sets per group (also unevenly), a last image set part empty, lanes that see no
# column of a chunk.
CASES = [
    (3, 4, 2, 1000, torch.float32, small_config(images=2, lanes=8, vec=4, chunk_tiles=4, groups=1)),
    (3, 12, 2, 1000, torch.float32, small_config(images=4, lanes=16, vec=2, chunk_tiles=3, groups=1)),
    (1, 2, 2, 7, torch.float32, None),
    (3, 3, 1, 1, torch.float32, None),
    (3, 2, 1, 1000, torch.float32, small_config(images=1, lanes=64, vec=4, chunk_tiles=1, groups=2)),
    (1, 4, 2, 65537, torch.float32, None),
    (3, 5, 2, 1000, torch.bfloat16, small_config(images=2, lanes=8, vec=4, chunk_tiles=4, groups=1)),
    (1, 12, 1, 1000, torch.bfloat16, None),
    (3, 12, 2, 7, torch.float16, None),
    (4, 10, 2, 1024, torch.bfloat16, small_config(images=2, lanes=16, vec=4, chunk_tiles=4, groups=1)),
    (4, 12, 2, 512, torch.float32, small_config(images=4, lanes=8, vec=2, chunk_tiles=2, groups=1)),
    (5, 10, 2, 999, torch.float32, small_config(images=2, lanes=8, vec=4, chunk_tiles=8, groups=2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, n_crops, n_teacher, K, dtype, config", CASES)
def test_matches_reference(device, batch, n_crops, n_teacher, K, dtype, config, poisoned_allocations):
    student, teacher, center = make_inputs(batch, n_crops, n_teacher, K, dtype, device, seed=batch * 1000 + K)
    ours, ref = kernel_and_reference(student, teacher, center, n_teacher, config)
    assert_matches(ours, ref, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_of_magnitude_1e4(device, dtype, poisoned_allocations):
    student, teacher, center = make_inputs(3, 5, 2, 1000, dtype, device, seed=7, scale=1e4)
    config = small_config(images=2, lanes=8, vec=4, chunk_tiles=4, groups=1)
    ours, ref = kernel_and_reference(student, teacher, center, 2, config)
    assert_matches(ours, ref, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_equal_logits(device, poisoned_allocations):
    batch, n_crops, K = 3, 5, 1000
    config = small_config(images=2, lanes=8, vec=4, chunk_tiles=4, groups=1)
    # Every row constant: q and p uniform, loss ln K, gradient 0.
    student = torch.full((n_crops * batch, K), 3.7, device=device)
    teacher = torch.full((2 * batch, K), -2.0, device=device)
    (loss, grad, _), _ = kernel_and_reference(student, teacher, torch.zeros(K, device=device), 2, config)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)
    grad_scale = GRAD_OUT / (STUDENT_TEMP * batch * (2 * n_crops - 2))
    assert grad.abs().max().item() < 1e-6 * grad_scale
    # Some constant rows, some extreme, among random ones. (A centre would make the 1e4 row
    # ill-conditioned: fp32 resolves 1e4 - c only to 1e-3, which 1/tau_t amplifies.)
    student, teacher, _ = make_inputs(batch, n_crops, 2, K, torch.float32, device, seed=3)
    student[2], student[7], teacher[1], teacher[4] = 5.0, -1e4, 1e4, 0.0
    ours, ref = kernel_and_reference(student, teacher, torch.zeros(K, device=device), 2, config)
    assert_matches(ours, ref, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    student, teacher, center = make_inputs(3, 4, 2, 2000, torch.float32, device, seed=11)
    base = student.clone().requires_grad_()
    strided = base[:, ::2]  # [12, 1000], row stride 2000, column stride 2
    teacher_t = teacher[:, ::2].t().contiguous().t()  # column-major
    config = small_config(images=2, lanes=8, vec=4, chunk_tiles=4, groups=1)
    loss, teacher_sum = dl.dino_loss(strided, teacher_t, center[::2], STUDENT_TEMP, 0.04, config=config)
    loss.backward()
    s_ref = student[:, ::2].contiguous().requires_grad_()
    loss_ref, teacher_sum_ref = dl.dino_loss_reference(s_ref, teacher[:, ::2], center[::2], STUDENT_TEMP, 0.04)
    loss_ref.backward()
    assert rel_err(loss, loss_ref) < 1e-5 and rel_err(teacher_sum, teacher_sum_ref) < 1e-5
    assert rel_err(base.grad[:, ::2], s_ref.grad) < 1e-5
    assert (base.grad[:, 1::2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_forward_only_does_no_backward_work(device, monkeypatch):
    student, teacher, center = make_inputs(3, 4, 2, 1000, torch.float32, device, seed=5)
    config = small_config(images=2, lanes=8, vec=4, chunk_tiles=4, groups=1)
    with_grad, _ = dl.dino_loss(student.clone().requires_grad_(), teacher, center, STUDENT_TEMP, 0.04, config=config)

    def no_backward(*args, **kwargs):
        raise AssertionError("backward work in a forward-only call")

    monkeypatch.setattr(dl, "_dino_loss_backward", no_backward)
    plain, _ = dl.dino_loss(student, teacher, center, STUDENT_TEMP, 0.04, config=config)
    with torch.no_grad():
        no_grad, _ = dl.dino_loss(student.clone().requires_grad_(), teacher, center, STUDENT_TEMP, 0.04, config=config)
    for loss in (plain, no_grad):
        assert loss.grad_fn is None and torch.equal(loss, with_grad.detach())


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU and compiled triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 16])
def test_default_config_at_training_size_on_cuda(dtype, batch, poisoned_allocations):
    student, teacher, center = make_inputs(batch, 12, 2, 65536, dtype, "cuda", seed=batch)
    ours, ref = kernel_and_reference(student, teacher, center, 2, None)
    assert_matches(ours, ref, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_default_gpu_config(device, monkeypatch, poisoned_allocations):
    """The launch shape chosen for an H100 (132 SMs) fits its limits and is correct (on the CPU
    this runs it through the interpreter)."""
    h100 = type("Props", (), {"multi_processor_count": 132})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: h100)
    for batch, n_crops, K in [(64, 12, 65536), (128, 10, 65536), (32, 8, 65536), (1, 2, 65537), (8, 12, 4096)]:
        config = dl.dino_loss_config(batch, n_crops, 2, K, torch.device("cuda"))
        n_chunks = math.ceil(math.ceil(K / (config.fwd_lanes * config.fwd_vec)) / config.fwd_chunk_tiles)
        assert config.fwd_images * config.fwd_lanes == 32 * config.num_warps  # one image per warp, lane per thread
        assert n_chunks <= dl.MAX_FWD_CHUNKS and 1 <= config.fwd_groups <= math.ceil(batch / config.fwd_images)
        assert n_chunks * config.fwd_groups <= dl.FWD_PROGRAMS_PER_SM * 132  # all forward programs resident at once
        assert config.block_k & (config.block_k - 1) == 0 and config.block_k >= 128
    config = dl.dino_loss_config(8, 12, 2, 4096, torch.device("cuda"))
    student, teacher, center = make_inputs(8, 12, 2, 4096, torch.float32, device, seed=8)
    ours, ref = kernel_and_reference(student, teacher, center, 2, config)
    assert_matches(ours, ref, 1e-5)


@pytest.mark.parametrize("batch, n_crops, n_teacher, K", [(3, 4, 2, 50), (2, 3, 1, 7), (1, 12, 2, 33)])
def test_reference_matches_official_pair_by_pair(batch, n_crops, n_teacher, K):
    student, teacher, center = make_inputs(batch, n_crops, n_teacher, K, torch.float32, "cpu", seed=K)
    s_ref = student.clone().requires_grad_()
    s_off = student.clone().requires_grad_()
    loss_ref, sum_ref = dl.dino_loss_reference(s_ref, teacher, center, STUDENT_TEMP, 0.07, n_teacher_views=n_teacher)
    loss_off, sum_off = dl.dino_loss_official_eager(s_off, teacher, center, STUDENT_TEMP, 0.07,
                                                    n_teacher_views=n_teacher)
    loss_ref.backward()
    loss_off.backward()
    assert rel_err(loss_ref, loss_off) < 1e-6
    assert rel_err(s_ref.grad, s_off.grad) < 1e-5
    assert torch.equal(sum_ref, sum_off)


def test_rejects_rows_that_do_not_split():
    with pytest.raises(ValueError, match="do not split"):
        dl.dino_loss(torch.zeros(6, 5), torch.zeros(3, 5), torch.zeros(5), STUDENT_TEMP, 0.04)
    with pytest.raises(ValueError, match="not a multiple"):
        dl.dino_loss(torch.zeros(7, 5), torch.zeros(4, 5), torch.zeros(5), STUDENT_TEMP, 0.04)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dino_loss_module_in_training_order(device, dtype):
    """DINOLoss(impl="triton") as the trainer drives it: forward (which updates the centre
    buffer in place), then backward, two steps in a row, against impl="torch". The fused
    loss once saved a view of the centre for backward and crashed here at the first backward
    ("modified by an inplace operation") while every kernel-level test passed.
    Tolerances (relative to the largest entry): fp32 logits 1e-5 (reduction order only); bf16
    logits 1e-2 (fp32 arithmetic on both sides, but each gradient is rounded to bf16, 2^-8)."""
    from fastdino.ssl import DINOLoss

    n_crops, batch, K = 5, 3, 257
    modules = {impl: DINOLoss(K, n_crops, 0.04, 0.07, 2, 10, impl=impl).to(device) for impl in ("triton", "torch")}
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for epoch, seed in enumerate((11, 12)):
        student, teacher, _ = make_inputs(batch, n_crops, 2, K, dtype, device, seed)
        results = {}
        for impl, module in modules.items():
            s = student.clone().requires_grad_()
            loss = module(s, teacher, epoch)
            (loss * GRAD_OUT).backward()
            results[impl] = (loss.detach(), s.grad, module.center.clone())
        for name, a, b in zip(("loss", "grad", "center"), results["triton"], results["torch"]):
            assert torch.isfinite(a).all(), name
            assert rel_err(a, b) < tol, f"epoch {epoch} {name}: relative error {rel_err(a, b):.3g} >= {tol}"
    assert not torch.equal(modules["triton"].center, torch.zeros_like(modules["triton"].center))


COMPILE_FOR_H100 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastdino_kernels.dino_loss as dl

def compile_for_sm90(kernel, pointers, ints, floats, constexprs, num_warps):
    names = kernel.arg_names
    signature = {n: pointers.get(n) or ("i32" if n in ints else "fp32" if n in floats else "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}  # 16-byte aligned, as torch allocates
    triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=num_warps, enable_fp_fusion=True))

for dtype, V, NT, block_k, vec, masked in [("bf16", 12, 2, 256, 2, False), ("fp32", 3, 1, 1024, 4, True),
                                           ("fp16", 2, 2, 2048, 2, True)]:
    shape = dict(V=V, NT=NT, V_PAD=triton.next_power_of_2(V), NT_PAD=triton.next_power_of_2(NT))
    f32 = "*fp32"
    compile_for_sm90(dl._dino_loss_fwd_kernel, dict(S="*" + dtype, T="*" + dtype, C=f32, STATE=f32, COLSUM=f32),
                     ("B", "K", "n_chunks", "chunk_len", "n_groups"), ("s_scale", "t_scale"),
                     dict(V=V, NT=NT, IMAGES=4, LANES=32, VEC=vec, MASKED=masked), 4)
    compile_for_sm90(dl._dino_loss_fwd_finalize_kernel,
                     dict(STATE=f32, COLSUM=f32, LOSS=f32, STATS_S=f32, STATS_T=f32, TEACHER_SUM=f32),
                     ("B", "K", "n_chunks", "n_groups"), ("s_scale", "t_scale", "loss_scale"),
                     dict(shape, CHUNK_PAD=128, GROUP_PAD=8, BLOCK_C=512), 4)
    compile_for_sm90(dl._dino_loss_bwd_kernel,
                     dict(S="*" + dtype, T="*" + dtype, C=f32, STATS_S=f32, STATS_T=f32, GRAD_LOSS=f32, DS="*" + dtype),
                     ("B", "K", "chunk_len"), ("s_scale", "t_scale", "grad_scale"), dict(shape, BLOCK_K=block_k), 4)
print("compiled")
"""


@pytest.mark.skipif(ON_CUDA, reason="the CUDA cases compile the kernels")
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter accepts programs the GPU compiler rejects: compile every kernel to sm_90
    machine code (Triton ships ptxas) in a process where triton is not interpreted."""
    assert_compiles_for_h100(COMPILE_FOR_H100)


def test_forward_resources_on_sm90(tmp_path):
    """The forward as dino_loss launches it at the training shapes (B 64 and 128, 10 and 12
    crops, bf16 and fp32), compiled for sm_90 by bench/kernel_report.py without a GPU: no warp
    shuffle in the loop over K tiles (each lane keeps its own statistics until the end of its
    chunk), at most 400 SASS instructions per tile at bf16 and 12 crops (a tile holds 3584
    logits, as the 256-column tiles of one image with its crops padded to 16 did before), no
    spill store in the loop, and every program resident at once with at least 4 per SM. Spills:
    none with the GPU machine's ptxas 12.8 (Triton 3.6); ptxas 13.4 (Triton 3.9) keeps bf16 at
    10 crops in 48 registers with one 4-byte spill, loaded once per tile."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    out = tmp_path / "report.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "bench/kernel_report.py", "--kernels", "fwd", "--json", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["batch"], r["crops"], r["dtype"]) for r in rows} == {
        (b, v, d) for b in (64, 128) for v in (10, 12) for d in ("bf16", "fp32")}
    for r in rows:
        where = f"B {r['batch']}, {r['crops']} crops, {r['dtype']}: {r['n_regs']} registers"
        assert r["tile_ops"]["SHFL"] == 0 and r["tile_ops"]["STL"] == 0, where
        assert r["spill_store_bytes"] == 0 or (r["ptxas"] != "ptxas 12.8" and r["spill_store_bytes"] <= 4), where
        assert r["blocks_per_sm"] >= max(4, dl.FWD_PROGRAMS_PER_SM) and r["waves"] <= 1, where
        if r["dtype"] == "bf16" and r["crops"] == 12:
            assert r["tile_instructions"] <= 400, where


@pytest.mark.skipif(ON_CPU or torch.cuda.is_available(), reason="the kernels are tested in this process")
def test_cpu_cases_in_a_fresh_interpreter():
    """Another test module imported triton compiled before this one: re-run this file in a
    process that switches the interpreter on before importing triton."""
    assert_passes_under_interpreter(__file__)
