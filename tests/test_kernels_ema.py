"""Multi-tensor Triton EMA against torch.lerp / torch._foreach_lerp_.

Runs on CUDA tensors when a GPU is present and through the Triton interpreter on the CPU
otherwise; see tests/test_kernels_dino_loss.py for how interpreter mode is switched on.
"""
import pytest
import torch
from kernel_subprocess import (assert_compiles_for_h100, assert_passes_under_interpreter, import_kernel_module,
                               kernel_devices)

ema = import_kernel_module("ema")
ON_CPU, ON_CUDA, DEVICES = kernel_devices(ema._ema_kernel)
# Odd sizes: single elements, tails, exactly one chunk, chunk + 1, several chunks.
SHAPES = [(1,), (7,), (3, 5, 7), (1000,), (ema.CHUNK,), (ema.CHUNK + 1,), (2, 21001), (1, 1)]


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while it runs a kernel."""
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_pairs(teacher_dtype, student_dtype, device, seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    teachers = [torch.randn(s, generator=gen).to(device, teacher_dtype) for s in shapes]
    students = [torch.randn(s, generator=gen).mul(3).to(device, student_dtype) for s in shapes]
    return teachers, students


def lerped(teachers, students, momentum):
    """torch.lerp in fp32, rounded once into each teacher's dtype."""
    return [torch.lerp(t.float(), s.float(), 1 - momentum).to(t.dtype) for t, s in zip(teachers, students)]


def bf16_ulps(a, b):
    """Largest distance in bf16 units in the last place (same-sign values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.996, 0.3, 0.5, 0.0, 1.0])  # 1 - m below, at and above 0.5
def test_fp32_bit_exact_with_torch_lerp(device, momentum):
    teachers, students = make_pairs(torch.float32, torch.float32, device, seed=int(momentum * 1000))
    students_before = [s.clone() for s in students]
    expected = [torch.lerp(t, s, 1 - momentum) for t, s in zip(teachers, students)]
    ema.ema_update_tensors_(teachers, students, momentum)
    for t, e in zip(teachers, expected):
        assert torch.equal(t, e)
    for s, before in zip(students, students_before):
        assert torch.equal(s, before)


@pytest.mark.parametrize("device", DEVICES)
def test_centre_in_the_same_launch(device):
    teachers, students = make_pairs(torch.bfloat16, torch.float32, device, seed=1)
    gen = torch.Generator().manual_seed(2)
    center = torch.randn(65537, generator=gen).to(device)
    batch_center = torch.randn(65537, generator=gen).to(device)
    expected_center = torch.lerp(center, batch_center, 1 - 0.9)
    expected = lerped(teachers, students, 0.996)
    ema.ema_update_tensors_(teachers, students, 0.996, center=center, center_update=batch_center,
                            center_momentum=0.9)
    assert torch.equal(center, expected_center)
    for t, e in zip(teachers, expected):
        assert bf16_ulps(t, e) <= (0 if device == "cuda" else 1)
    # The centre alone.
    expected_center = torch.lerp(center, batch_center, 1 - 0.5)
    ema.ema_update_tensors_([], [], 0.996, center=center, center_update=batch_center, center_momentum=0.5)
    assert torch.equal(center, expected_center)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("teacher_dtype, student_dtype", [(torch.bfloat16, torch.bfloat16),
                                                          (torch.float32, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32)])
def test_bf16_and_mixed_dtypes(device, teacher_dtype, student_dtype):
    teachers, students = make_pairs(teacher_dtype, student_dtype, device, seed=3)
    # One list may mix dtypes: add an fp32/fp32 pair.
    teachers.append(torch.randn(999, device=device))
    students.append(torch.randn(999, device=device))
    expected = lerped(teachers, students, 0.996)
    ema.ema_update_tensors_(teachers, students, 0.996)
    for t, e in zip(teachers, expected):
        if t.dtype == torch.float32:
            assert torch.equal(t, e)
        else:
            # fp32 arithmetic is exact; CUDA rounds to nearest even like torch, the
            # interpreter's fp32 -> bf16 cast truncates (at most 1 ulp away).
            assert bf16_ulps(t, e) <= (0 if device == "cuda" else 1)


@pytest.mark.parametrize("device", DEVICES)
def test_cached_tables_follow_the_tensors(device):
    teachers, students = make_pairs(torch.float32, torch.float32, device, seed=4)
    expected = lerped(lerped(teachers, students, 0.9), students, 0.99)
    ema.ema_update_tensors_(teachers, students, 0.9)
    ema.ema_update_tensors_(teachers, students, 0.99)  # reuses the cached tables
    for t, e in zip(teachers, expected):
        assert torch.equal(t, e)
    others, other_students = make_pairs(torch.float32, torch.float32, device, seed=5, shapes=[(5,), (40000,)])
    expected = lerped(others, other_students, 0.9)
    ema.ema_update_tensors_(others, other_students, 0.9)
    for t, e in zip(others, expected):
        assert torch.equal(t, e)


@pytest.mark.parametrize("teacher_dtype, student_dtype", [(torch.float32, torch.float32),
                                                          (torch.bfloat16, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32)])
def test_reference_twin(teacher_dtype, student_dtype):
    teachers, students = make_pairs(teacher_dtype, student_dtype, "cpu", seed=6)
    center, batch_center = torch.randn(33), torch.randn(33)
    expected_center = torch.lerp(center, batch_center, 1 - 0.9)
    expected = lerped(teachers, students, 0.996)
    ema.ema_update_tensors_reference_(teachers, students, 0.996, center=center, center_update=batch_center,
                                      center_momentum=0.9)
    assert torch.equal(center, expected_center)
    for t, e in zip(teachers, expected):
        assert torch.equal(t, e)


def test_rejects_what_it_cannot_update():
    with pytest.raises(ValueError, match="shapes differ"):
        ema.ema_update_tensors_([torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        ema.ema_update_tensors_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9)
    with pytest.raises(TypeError, match="fp32 or bf16"):
        ema.ema_update_tensors_([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)], 0.9)
    with pytest.raises(ValueError, match="teacher tensors"):
        ema.ema_update_tensors_([torch.zeros(3)], [], 0.9)


COMPILE_FOR_H100 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastdino_kernels.ema as ema

names = ema._ema_kernel.arg_names
tables = ("TEACHER_PTRS", "STUDENT_PTRS", "NUMELS", "DTYPES", "CHUNK_TENSOR", "CHUNK_START")
types = dict({n: "*i64" for n in tables}, n_chunks="i32", center_ptr="i64", center_new_ptr="i64", center_numel="i32",
             coef="fp32", from_student="i32", center_coef="fp32", center_from_student="i32")
signature = {n: types.get(n, "constexpr") for n in names}
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in tables}
triton.compile(ASTSource(ema._ema_kernel, signature, dict(CHUNK=ema.CHUNK, BLOCK=ema.BLOCK), attrs),
               target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, enable_fp_fusion=False))
print("compiled")
"""


@pytest.mark.skipif(ON_CUDA, reason="the CUDA cases compile the kernel")
def test_kernel_compiles_for_h100_without_a_gpu():
    """The interpreter accepts programs the GPU compiler rejects: compile the kernel to sm_90
    machine code (Triton ships ptxas) in a process where triton is not interpreted."""
    assert_compiles_for_h100(COMPILE_FOR_H100)


@pytest.mark.skipif(ON_CPU or torch.cuda.is_available(), reason="the kernels are tested in this process")
def test_cpu_cases_in_a_fresh_interpreter():
    """Another test module imported triton compiled before this one: re-run this file in a
    process that switches the interpreter on before importing triton."""
    assert_passes_under_interpreter(__file__)
