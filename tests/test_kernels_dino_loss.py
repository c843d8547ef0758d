"""Triton DINO loss kernels against the PyTorch reference (and the reference against the
official pair-by-pair arithmetic).

The kernels run on CUDA tensors when a GPU is present and on CPU tensors through the Triton
interpreter otherwise. Triton picks interpreter mode when a function is decorated, and
`triton.language` decorates its own functions at its first import, so on a machine without a
GPU this module imports the kernels with TRITON_INTERPRET=1 (then restores the environment, so
that other modules' dispatch is unaffected). If another test module imported triton first, the
CPU cases skip and one test re-runs this file in a fresh interpreter process instead.
"""
import math

import pytest
import torch
from kernel_subprocess import (assert_compiles_for_h100, assert_passes_under_interpreter, import_kernel_module,
                               kernel_devices)

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


# (batch, n_crops, n_teacher, K, dtype, config): odd K with masked tails, 2+0 / 2+3 / 2+10
# crops, one or two teacher views; small configs force several chunks, groups and tiles.
CASES = [
    (3, 4, 2, 1000, torch.float32, DinoLossConfig(block_k=64, fwd_chunk_tiles=4, fwd_groups=2, bwd_chunk_tiles=3)),
    (3, 12, 2, 1000, torch.float32, DinoLossConfig(block_k=128, fwd_chunk_tiles=3, fwd_groups=3, bwd_chunk_tiles=2)),
    (1, 2, 2, 7, torch.float32, None),
    (3, 3, 1, 1, torch.float32, None),
    (3, 2, 1, 1000, torch.float32, DinoLossConfig(block_k=256, fwd_chunk_tiles=1, fwd_groups=2, bwd_chunk_tiles=4)),
    (1, 4, 2, 65537, torch.float32, None),
    (3, 5, 2, 1000, torch.bfloat16, DinoLossConfig(block_k=64, fwd_chunk_tiles=4, fwd_groups=2, bwd_chunk_tiles=3)),
    (1, 12, 1, 1000, torch.bfloat16, None),
    (3, 12, 2, 7, torch.float16, None),
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
    config = DinoLossConfig(block_k=64, fwd_chunk_tiles=4, fwd_groups=2, bwd_chunk_tiles=3)
    ours, ref = kernel_and_reference(student, teacher, center, 2, config)
    assert_matches(ours, ref, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_rows_of_equal_logits(device, poisoned_allocations):
    batch, n_crops, K = 3, 5, 1000
    config = DinoLossConfig(block_k=64, fwd_chunk_tiles=4, fwd_groups=2, bwd_chunk_tiles=3)
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
    config = DinoLossConfig(block_k=64, fwd_chunk_tiles=4, fwd_groups=2, bwd_chunk_tiles=3)
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
    config = DinoLossConfig(block_k=64, fwd_chunk_tiles=4, fwd_groups=2, bwd_chunk_tiles=3)
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
    for batch, n_crops, K in [(64, 12, 65536), (128, 12, 65536), (32, 8, 65536), (1, 2, 65537), (8, 12, 4096)]:
        config = dl.dino_loss_config(batch, n_crops, 2, K, torch.device("cuda"))
        n_tiles = math.ceil(K / config.block_k)
        n_chunks = math.ceil(n_tiles / config.fwd_chunk_tiles)
        assert config.block_k & (config.block_k - 1) == 0 and config.block_k >= 128
        assert n_chunks <= dl.MAX_FWD_CHUNKS and 1 <= config.fwd_groups <= batch
        assert n_chunks * config.fwd_groups <= 4 * 132  # all forward programs resident at once
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

for dtype, V, NT, block_k in [("bf16", 12, 2, 256), ("fp32", 3, 1, 1024), ("fp16", 2, 2, 2048)]:
    shape = dict(V=V, NT=NT, V_PAD=triton.next_power_of_2(V), NT_PAD=triton.next_power_of_2(NT))
    f32 = "*fp32"
    compile_for_sm90(dl._dino_loss_fwd_kernel, dict(S="*" + dtype, T="*" + dtype, C=f32, STATE=f32, COLSUM=f32),
                     ("B", "K", "n_chunks", "chunk_len", "n_groups"), ("s_scale", "t_scale"),
                     dict(shape, BLOCK_K=block_k), 4)
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


@pytest.mark.skipif(ON_CPU or torch.cuda.is_available(), reason="the kernels are tested in this process")
def test_cpu_cases_in_a_fresh_interpreter():
    """Another test module imported triton compiled before this one: re-run this file in a
    process that switches the interpreter on before importing triton."""
    assert_passes_under_interpreter(__file__)
