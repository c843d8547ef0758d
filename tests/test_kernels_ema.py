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
# Awkward sizes: single elements, an empty tensor, tails of a BLOCK and of a CHUNK, exactly one
# chunk, chunk + 1, several chunks with a tail.
SHAPES = [(1,), (7,), (3, 5, 7), (0,), (ema.BLOCK - 1,), (ema.BLOCK + 1,), (1000,), (ema.CHUNK - 1,), (ema.CHUNK,),
          (ema.CHUNK + 1,), (2, 21001), (1, 1)]
# (momentum, whether torch.lerp's weight 1 - momentum takes its second branch, |w| >= 0.5:
# fma(w - 1, s - t, s)); momenta near 0 and 1, and around 0.5, both sides.
MOMENTA = [(1.0, False), (0.9999999, False), (0.996, False), (0.5000001, False), (0.5, True), (0.4999999, True),
           (0.3, True), (1e-7, True), (0.0, True)]


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while it runs a kernel."""
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_pairs(teacher_dtype, student_dtype, device, seed, shapes=SHAPES):
    """Fresh teachers and students of `shapes`: values over several binades, students on
    another scale than the teachers so that s - t rounds."""
    gen = torch.Generator().manual_seed(seed)

    def draw(shape, scale):
        return (torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-6, 7, shape, generator=gen)) * scale)

    teachers = [draw(s, 1.0).to(device, teacher_dtype) for s in shapes]
    students = [draw(s, 3.0).to(device, student_dtype) for s in shapes]
    return teachers, students


def lerped(teachers, students, momentum):
    """torch.lerp in fp32, rounded once into each teacher's dtype."""
    return [torch.lerp(t.float(), s.float(), 1 - momentum).to(t.dtype) for t, s in zip(teachers, students)]


def bf16_ulps(a, b):
    """Largest distance in bf16 units in the last place (same-sign values)."""
    if a.numel() == 0:
        return 0
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


def assert_updated(teachers, expected, device):
    """fp32 teachers bitwise equal; bf16 ones too on CUDA (round to nearest even, as torch),
    within 1 ulp under the interpreter, whose fp32 -> bf16 cast truncates."""
    for t, e in zip(teachers, expected):
        assert t.dtype == e.dtype and t.shape == e.shape
        if t.dtype == torch.float32:
            assert torch.equal(t, e)
        else:
            assert bf16_ulps(t, e) <= (0 if device == "cuda" else 1)


def test_momenta_take_both_lerp_branches():
    assert [bool(ema._lerp_coefficients(m)[1]) for m, _ in MOMENTA] == [branch for _, branch in MOMENTA]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [m for m, _ in MOMENTA])
def test_fp32_bit_exact_with_torch_lerp(device, momentum):
    teachers, students = make_pairs(torch.float32, torch.float32, device, seed=int(momentum * 1e7) + 11)
    students_before = [s.clone() for s in students]
    expected = [torch.lerp(t, s, 1 - momentum) for t, s in zip(teachers, students)]
    ema.ema_update_tensors_(teachers, students, momentum)
    for t, e in zip(teachers, expected):
        assert torch.equal(t, e)
    for s, before in zip(students, students_before):
        assert torch.equal(s, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_into_flat_buffers_at_unaligned_offsets(device, dtype):
    """DeepSpeed's parameters are views into flat buffers, which may start on any element: the
    launcher then takes the path without 16-byte vector accesses, with the same result."""
    gen = torch.Generator().manual_seed(5)
    sizes = [ema.BLOCK + 3, 1, ema.CHUNK + 5, 7]
    flat_t = torch.randn(sum(sizes) + 1, generator=gen).to(device, dtype)
    flat_s = torch.randn(sum(sizes) + 1, generator=gen).to(device, dtype)
    teachers = list(flat_t[1:].split(sizes))  # element 1 on: 4 or 2 bytes past the allocation
    students = list(flat_s[1:].split(sizes))
    assert teachers[0].data_ptr() % 16
    expected = [t.clone() for t in teachers]
    ema.ema_update_tensors_reference_(expected, students, 0.996)
    ema.ema_update_tensors_(teachers, students, 0.996)
    for t, e in zip(teachers, expected):  # bf16: as in test_bf16_and_mixed_dtypes
        assert torch.equal(t, e) if dtype == torch.float32 else bf16_ulps(t, e) <= (0 if device == "cuda" else 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.9999999, 0.996, 0.3, 1e-7])
@pytest.mark.parametrize("teacher_dtype, student_dtype", [(torch.bfloat16, torch.bfloat16),
                                                          (torch.float32, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32)])
def test_bf16_and_mixed_dtypes(device, momentum, teacher_dtype, student_dtype):
    teachers, students = make_pairs(teacher_dtype, student_dtype, device, seed=3 + int(momentum * 1e7))
    # One list may mix dtypes: add a pair of every other combination.
    for i, (td, sd) in enumerate([(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]):
        t, s = make_pairs(td, sd, device, seed=100 + i, shapes=[(999,), (ema.CHUNK + 3,)])
        teachers += t
        students += s
    students_before = [s.clone() for s in students]
    expected = lerped(teachers, students, momentum)
    ema.ema_update_tensors_(teachers, students, momentum)
    assert_updated(teachers, expected, device)
    for s, before in zip(students, students_before):
        assert torch.equal(s, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_element(device, dtype):
    for momentum in (0.996, 0.3):
        teachers, students = make_pairs(dtype, torch.float32, device, seed=7, shapes=[(1,)])
        expected = lerped(teachers, students, momentum)
        ema.ema_update_tensors_(teachers, students, momentum)
        assert_updated(teachers, expected, device)


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_to_update(device):
    for update in (ema.ema_update_tensors_, ema.ema_update_tensors_reference_):
        update([], [], 0.996)  # an empty list: no device, no launch
        teachers, students = make_pairs(torch.float32, torch.float32, device, seed=8, shapes=[(0,), (2, 0, 3)])
        update(teachers, students, 0.996)  # no chunks: no launch
        assert [t.shape for t in teachers] == [(0,), (2, 0, 3)]


@pytest.mark.parametrize("device", DEVICES)
def test_cached_tables_follow_the_tensors(device):
    teachers, students = make_pairs(torch.float32, torch.float32, device, seed=4)
    expected = lerped(lerped(teachers, students, 0.9), students, 0.3)
    ema.ema_update_tensors_(teachers, students, 0.9)
    ema.ema_update_tensors_(teachers, students, 0.3)  # reuses the cached tables, other lerp branch
    for t, e in zip(teachers, expected):
        assert torch.equal(t, e)
    others, other_students = make_pairs(torch.float32, torch.float32, device, seed=5, shapes=[(5,), (40000,)])
    expected = lerped(others, other_students, 0.9)
    ema.ema_update_tensors_(others, other_students, 0.9)
    for t, e in zip(others, expected):
        assert torch.equal(t, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.996, 1e-7])
def test_kernel_matches_its_twin(device, momentum):
    """One mixed list, updated by the kernel and by the PyTorch twin."""
    teachers, students = [], []
    for i, (td, sd) in enumerate([(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                  (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]):
        t, s = make_pairs(td, sd, device, seed=20 + i, shapes=SHAPES[i::3])
        teachers += t
        students += s
    twins = [t.clone() for t in teachers]
    ema.ema_update_tensors_(teachers, students, momentum)
    ema.ema_update_tensors_reference_(twins, students, momentum)
    assert_updated(teachers, twins, device)


@pytest.mark.parametrize("momentum", [0.996, 0.5, 1e-7])
@pytest.mark.parametrize("teacher_dtype, student_dtype", [(torch.float32, torch.float32),
                                                          (torch.bfloat16, torch.bfloat16),
                                                          (torch.bfloat16, torch.float32),
                                                          (torch.float32, torch.bfloat16)])
def test_reference_twin(momentum, teacher_dtype, student_dtype):
    teachers, students = make_pairs(teacher_dtype, student_dtype, "cpu", seed=6)
    expected = lerped(teachers, students, momentum)
    ema.ema_update_tensors_reference_(teachers, students, momentum)
    for t, e in zip(teachers, expected):
        assert torch.equal(t, e)


def test_rejects_what_it_cannot_update():
    for update in (ema.ema_update_tensors_, ema.ema_update_tensors_reference_):
        with pytest.raises(ValueError, match="shapes differ"):
            update([torch.zeros(3)], [torch.zeros(4)], 0.9)
        with pytest.raises(ValueError, match="contiguous"):
            update([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.9)
        with pytest.raises(TypeError, match="fp32 or bf16"):
            update([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)], 0.9)
        with pytest.raises(ValueError, match="teacher tensors"):
            update([torch.zeros(3)], [], 0.9)


COMPILE_FOR_H100 = r"""
import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastdino_kernels.ema as ema

names = ema._ema_kernel.arg_names
tables = ("TEACHER_PTRS", "STUDENT_PTRS", "NUMELS", "DTYPES", "CHUNK_TENSOR", "CHUNK_START")
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in tables}
# from_student as a runtime argument (momentum > 0.5) and as the constant 1 Triton's binder makes of it (<= 0.5);
# tensors that all start on 16 bytes (vector accesses) and some that do not.
for constants, aligned in itertools.product(({}, {"from_student": 1}), (True, False)):
    types = dict({n: "*i64" for n in tables}, coef="fp32", from_student="i32")
    types.update((n, "constexpr") for n in constants)
    signature = {n: types.get(n, "constexpr") for n in names}
    triton.compile(ASTSource(ema._ema_kernel, signature,
                             dict(CHUNK=ema.CHUNK, BLOCK=ema.BLOCK, ALIGNED=aligned, **constants), attrs),
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
