"""Multi-tensor Triton scaling (the multiply of per-parameter clipping) against torch, and
DINOAdamW's clipping through it: results, and launches counted.

Runs on CUDA tensors when a GPU is present and through the Triton interpreter on the CPU
otherwise (tests/kernel_subprocess.py: a fresh interpreter where triton was imported compiled).
Tolerances: fp32 bitwise; bf16 bitwise on CUDA, within 1 bf16 ulp under the interpreter,
whose fp32 -> bf16 cast truncates instead of rounding to nearest even (and mishandles
subnormal results: those are compared on CUDA only).
"""
import logging
import os

import pytest
import torch
from kernel_subprocess import (assert_compiles_for_h100, assert_passes_under_interpreter, import_kernel_module,
                               kernel_devices)
from op_count import CountOps

clip = import_kernel_module("clip")
# Huge scales overflow to inf, inf * 0 is NaN, on purpose (numpy warns under the interpreter).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")]
ON_CPU, ON_CUDA, DEVICES = kernel_devices(clip._scale_kernel)

from fastdino.parallel.optim import DINOAdamW, PartitionFragments  # noqa: E402  (after triton's mode is set)

# Awkward sizes: single elements, empty tensors, around a loop step (BLOCK fp32, 2 * BLOCK bf16
# elements) and a CHUNK, exactly one chunk, chunk + 1, several chunks with a tail.
SHAPES = [(1,), (7,), (3, 5, 7), (0,), (clip.BLOCK - 1,), (clip.BLOCK + 1,), (2 * clip.BLOCK - 1,),
          (2 * clip.BLOCK + 1,), (1000,), (clip.CHUNK - 1,), (clip.CHUNK,), (clip.CHUNK + 1,), (2, 21001), (1, 1),
          (2, 0, 3)]
# Scales exactly 1 (the tensor is left alone), tiny (products underflow into subnormals and to 0)
# and huge (products overflow to inf).
SPECIAL_SCALES = [1.0, 1e-38, 1e-45, 3e-30, 1e30, 3e38]


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """The interpreter also reads TRITON_INTERPRET while it runs a kernel."""
    if ON_CPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def launches(monkeypatch):
    """The grids of `_scale_kernel`'s launches inside the test (both triton modes launch through `run`)."""
    grids = []
    run = clip._scale_kernel.run

    def counted(*args, **kwargs):
        grids.append(kwargs["grid"])
        return run(*args, **kwargs)

    monkeypatch.setattr(clip._scale_kernel, "run", counted)
    return grids


def make_tensors(dtypes, device, seed, shapes=SHAPES):
    """Fresh tensors of `shapes`, dtypes in turn from `dtypes`, values over several binades."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * torch.exp2(torch.randint(-6, 7, s, generator=gen)))
            .to(device, dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


def make_scales(n, device, seed):
    """fp32 [n]: the special scales first, then log-uniform between 1e-4 and 1 (clipping's range)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.empty(n).uniform_(-9.2, 0.0, generator=gen))
    special = torch.tensor(SPECIAL_SCALES[:n])
    scales[:len(special)] = special[torch.randperm(len(special), generator=gen)]
    return scales.to(device)


def scaled(tensors, scales):
    """The product in fp32, rounded once into each tensor's dtype (torch's CPU multiply by a fp32 scalar)."""
    return [(t.float() * s).to(t.dtype) for t, s in zip(tensors, scales.cpu().unbind())]


def bf16_ulps(a, b):
    """Largest distance in bf16 units in the last place (same-sign values)."""
    if a.numel() == 0:
        return 0
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max().item()


def assert_scaled(tensors, expected, device):
    """fp32 bitwise; bf16 bitwise on CUDA, under the interpreter within 1 ulp where the result is
    normal (its fp32 -> bf16 cast truncates, and turns subnormal results into garbage)."""
    for t, e in zip(tensors, expected):
        assert t.dtype == e.dtype and t.shape == e.shape
        if t.dtype == torch.float32:
            assert torch.equal(t, e)
        elif device == "cuda":
            assert torch.equal(t.view(torch.int16), e.view(torch.int16))
        else:
            normal = e.float().abs() >= torch.finfo(torch.bfloat16).tiny
            assert bf16_ulps(t[normal], e[normal]) <= 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [1, 2])
def test_fp32_bit_exact_with_foreach_mul(device, seed):
    tensors = make_tensors([torch.float32], device, seed)
    scales = make_scales(len(tensors), device, seed)
    expected = [t.clone() for t in tensors]
    torch._foreach_mul_(expected, list(scales.unbind()))
    clip.scale_tensors_(tensors, scales)
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [[torch.bfloat16], [torch.bfloat16, torch.float32, torch.float32]],
                         ids=["bf16", "mixed"])
def test_bf16_and_mixed_lists(device, dtypes):
    tensors = make_tensors(dtypes, device, seed=3)
    scales = make_scales(len(tensors), device, seed=3)
    expected = scaled(tensors, scales)
    clip.scale_tensors_(tensors, scales)
    assert_scaled(tensors, expected, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_into_a_flat_buffer_at_unaligned_offsets(device, dtype, launches):
    """ZeRO's gradient fragments are views into one flat partition, starting on any element: the
    launcher then takes the path without 16-byte vector accesses, with the same result."""
    sizes = [2 * clip.BLOCK + 3, 1, clip.CHUNK + 5, 7, 0, 2 * clip.BLOCK]
    flat = make_tensors([dtype], device, seed=5, shapes=[(sum(sizes) + 1,)])[0]
    views = list(flat[1:].split(sizes))  # element 1 on: 4 or 2 bytes past the allocation
    assert views[0].data_ptr() % 16
    scales = make_scales(len(views), device, seed=5)
    expected = scaled(views, scales)
    first = flat[0].clone()
    clip.scale_tensors_(views, scales)
    assert_scaled(views, expected, device)
    assert torch.equal(flat[0], first)  # outside every view: untouched
    assert len(launches) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_scale_of_one_leaves_the_tensor_alone(device):
    """Not read nor written: NaN payloads and signed zeros survive bit for bit."""
    t = torch.tensor([float("nan"), -0.0, 1.5, -3.0], device=device)
    t.view(torch.int32)[0] = 0x7FC0_1234  # a NaN with a payload
    bits = t.view(torch.int32).clone()
    clip.scale_tensors_([t], torch.ones(1, device=device))
    assert torch.equal(t.view(torch.int32), bits)


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_scales_as_torch(device):
    """A non-finite gradient norm gives a NaN or 0 scale: NaN, inf * 0 and signed zeros as torch."""
    tensors = make_tensors([torch.float32], device, seed=10, shapes=[(5,), (clip.BLOCK + 3,), (3,)])
    for t in tensors:
        t[0] = 0.0
    scales = torch.tensor([float("nan"), float("inf"), -0.0], device=device)
    expected = [t.clone() for t in tensors]
    torch._foreach_mul_(expected, list(scales.unbind()))
    clip.scale_tensors_(tensors, scales)
    for t, e in zip(tensors, expected):
        assert torch.equal(t.isnan(), e.isnan()) and torch.equal(t[~t.isnan()], e[~e.isnan()])
        assert torch.equal(t.signbit(), e.signbit()) or bool(t.isnan().any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_element(device, dtype):
    for value in (0.37, 1.0, 1e-45):
        tensors = make_tensors([dtype], device, seed=7, shapes=[(1,)])
        scales = torch.tensor([value], device=device)
        expected = scaled(tensors, scales)
        clip.scale_tensors_(tensors, scales)
        assert_scaled(tensors, expected, device)


@pytest.mark.parametrize("device", DEVICES)
def test_nothing_to_scale_launches_nothing(device, launches):
    for scale in (clip.scale_tensors_, clip.scale_tensors_reference_):
        scale([], torch.empty(0, device=device))  # an empty list
        tensors = make_tensors([torch.float32], device, seed=8, shapes=[(0,), (2, 0, 3)])
        scale(tensors, torch.full((2,), 0.5, device=device))  # no chunks
        assert [t.shape for t in tensors] == [(0,), (2, 0, 3)]
    assert launches == []


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_for_many_tensors(device, launches):
    """One launch per call, one program per chunk, however many tensors."""
    shapes = [(i % 7 + 1, 13) for i in range(97)] + [(clip.CHUNK + 1,), (3 * clip.CHUNK,)]
    tensors = make_tensors([torch.float32, torch.bfloat16], device, seed=9, shapes=shapes)
    scales = make_scales(len(tensors), device, seed=9)
    expected = scaled(tensors, scales)
    clip.scale_tensors_(tensors, scales)
    assert_scaled(tensors, expected, device)
    assert launches == [(97 + 2 + 3,)]


@pytest.mark.parametrize("device", DEVICES)
def test_cached_tables_follow_the_tensors(device):
    tensors = make_tensors([torch.float32], device, seed=4)
    first, second = make_scales(len(tensors), device, 4), make_scales(len(tensors), device, 14)
    expected = scaled(scaled(tensors, first), second)
    clip.scale_tensors_(tensors, first)
    clip.scale_tensors_(tensors, second)  # the cached tables, other scales
    assert_scaled(tensors, expected, device)
    others = make_tensors([torch.bfloat16], device, seed=5, shapes=[(5,), (40000,)])
    scales = torch.tensor([0.25, 0.3], device=device)
    expected = scaled(others, scales)
    clip.scale_tensors_(others, scales)
    assert_scaled(others, expected, device)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_matches_its_twin(device):
    tensors = make_tensors([torch.float32, torch.bfloat16], device, seed=20)
    twins = [t.clone() for t in tensors]
    scales = make_scales(len(tensors), device, seed=20)
    clip.scale_tensors_(tensors, scales)
    clip.scale_tensors_reference_(twins, scales)
    assert_scaled(tensors, twins, device)


@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.bfloat16], [torch.bfloat16, torch.float32]])
def test_reference_twin(dtypes):
    tensors = make_tensors(dtypes, "cpu", seed=6)
    scales = make_scales(len(tensors), "cpu", seed=6)
    expected = scaled(tensors, scales)
    clip.scale_tensors_reference_(tensors, scales)
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)


def test_rejects_what_it_cannot_scale():
    for scale in (clip.scale_tensors_, clip.scale_tensors_reference_):
        with pytest.raises(ValueError, match="one entry per tensor"):
            scale([torch.zeros(3)], torch.ones(2))
        with pytest.raises(ValueError, match="fp32 vector"):
            scale([torch.zeros(3)], torch.ones(1, dtype=torch.float64))
        with pytest.raises(ValueError, match="contiguous"):
            scale([torch.zeros(4, 4).t()], torch.ones(1))
        with pytest.raises(TypeError, match="fp32 or bf16"):
            scale([torch.zeros(3, dtype=torch.float16)], torch.ones(1))
        with pytest.raises(ValueError, match="one device"):
            scale([torch.zeros(3, device="meta")], torch.ones(1))


# ---------------------------------------------------------------- DINOAdamW's clipping through the kernel

def official_clip_(grads, clip_grad):
    """main_dino.py's utils.clip_gradients, one parameter at a time."""
    for g in grads:
        coef = clip_grad / (g.norm(2) + 1e-6)
        if coef < 1:
            g.mul_(coef)


def random_grads(n, device, seed):
    """n gradients of awkward sizes, some within the clip (left alone), one zero (norm 0)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [[(), (1,), (7, 3), (5,), (2, 3, 4), (13,), (1, 1), (clip.BLOCK + 1,)][i % 8] for i in range(n)]
    grads = [(torch.randn(s, generator=gen) * (0.01 if i % 3 == 0 else 3.0)).to(device) for i, s in enumerate(shapes)]
    grads[-1].zero_()
    return grads


def clipped_by(impl, grads, clip_grad=0.7):
    """The gradients after one DINOAdamW step with clip_impl=`impl` (lr 0), the launches, the aten ops."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    optimizer = DINOAdamW([{"params": params}], lr=0.0, clip_grad=clip_grad)
    optimizer.clip_impl = impl
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer._clip_group(optimizer.param_groups[0])  # builds and caches the tables
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    with CountOps() as counted:
        optimizer._clip_group(optimizer.param_groups[0])
    return [p.grad for p in params], counted.ops


@pytest.mark.parametrize("device", DEVICES)
def test_dino_adamw_clipping_through_the_kernel(device, launches):
    """Equal to the official loop, bitwise equal to the twin (fp32), one launch per group and
    step, and as many aten ops for 100 parameters as for 10."""
    ops = {}
    for n in (10, 100):
        grads = random_grads(n, device, seed=n)
        launches.clear()
        got, ops[n] = clipped_by("triton", grads)
        assert len(launches) == 2  # one per _clip_group call
        twin, _ = clipped_by("torch", grads)
        official_clip_(grads, 0.7)
        for g, t, want in zip(got, twin, grads):
            assert torch.equal(g, t)
            torch.testing.assert_close(g, want, rtol=1e-6, atol=0)
    assert ops[10] == ops[100]


@pytest.mark.parametrize("device", [p for p in DEVICES if p.values == ("cpu",)])
def test_zero_fragments_through_the_kernel(device, one_rank_group, launches):
    """ZeRO 1/2's flat fp32 partition: the fragments are views at unaligned offsets (gloo: CPU only)."""
    grads = random_grads(9, device, seed=11)
    numels = [g.numel() for g in grads]
    flat = torch.zeros(sum(numels) + 3)  # ZeRO pads the flat buffer
    fragments = PartitionFragments(list(torch.split(flat, numels + [3]))[:-1], flat, flat, one_rank_group)
    assert any(view.data_ptr() % 16 for view in fragments.views(flat))
    partition = torch.nn.Parameter(torch.zeros_like(flat))
    optimizer = DINOAdamW([partition], lr=0.0, clip_grad=0.7)
    optimizer.clip_impl = "triton"
    optimizer.partition_fragments[id(partition)] = fragments
    partition.grad = torch.cat([g.flatten() for g in grads] + [torch.full((3,), 9.0)])
    official_clip_(grads, 0.7)
    optimizer.step()
    assert len(launches) == 1
    torch.testing.assert_close(partition.grad[:-3], torch.cat([g.flatten() for g in grads]), rtol=1e-6, atol=0)
    assert torch.equal(partition.grad[-3:], torch.full((3,), 9.0))  # padding: no parameter's, untouched


def test_auto_clip_impl_on_the_cpu_is_the_twin_and_logged(caplog, monkeypatch):
    monkeypatch.setattr("fastdino._dispatch._logged", set())  # resolve_impl logs each choice once per process
    grads = random_grads(3, "cpu", seed=12)
    with caplog.at_level(logging.INFO, logger="fastdino.parallel.optim"):
        got, _ = clipped_by("auto", grads)
    assert "DINOAdamW clipping: using the torch implementation" in caplog.text
    official_clip_(grads, 0.7)
    for g, want in zip(got, grads):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=0)


@pytest.mark.skipif(ON_CPU or torch.cuda.is_available(), reason="the kernel runs here")
def test_triton_asked_for_where_it_cannot_run_is_an_error():
    with pytest.raises(RuntimeError, match="impl='triton' cannot run here"):
        clipped_by("triton", random_grads(3, "cpu", seed=12))


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU and compiled triton")
def test_clipping_runs_a_constant_number_of_kernels_on_cuda():
    """Counted by the profiler: the same kernels for 10 and 100 parameters (the twin: one
    multiply kernel per gradient)."""
    from torch.profiler import ProfilerActivity, profile

    def kernels(impl, n):
        grads = random_grads(n, "cuda", seed=n)
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        optimizer = DINOAdamW([{"params": params}], lr=0.0, clip_grad=0.7)
        optimizer.clip_impl = impl
        for p, g in zip(params, grads):
            p.grad = g
        optimizer._clip_group(optimizer.param_groups[0])  # compiles, builds the tables
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            optimizer._clip_group(optimizer.param_groups[0])
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and not e.name.startswith(("Memcpy", "Memset"))]

    ten, hundred = kernels("triton", 10), kernels("triton", 100)
    assert sorted(ten) == sorted(hundred) and len(hundred) <= 10, hundred
    assert sum("_scale_kernel" in name for name in hundred) == 1
    assert len(kernels("torch", 100)) >= 100


COMPILE_FOR_H100 = r"""
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastdino_kernels.clip as clip

names = clip._scale_kernel.arg_names
tables = ("PTRS", "NUMELS", "DTYPES", "CHUNK_TENSOR", "CHUNK_START")
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in (*tables, "SCALES")}
signature = {n: "constexpr" for n in names} | {n: "*i64" for n in tables} | {"SCALES": "*fp32"}
for aligned in (True, False):  # tensors that all start on 16 bytes (vector accesses), and some that do not
    kernel = triton.compile(ASTSource(clip._scale_kernel, signature,
                                      dict(CHUNK=clip.CHUNK, BLOCK=clip.BLOCK, ALIGNED=aligned), attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, enable_fp_fusion=False))
    ptx = kernel.asm["ptx"]
    # Subnormal products as torch's (no flush to zero); 16-byte accesses exactly where aligned; the
    # loads and stores in one register layout (no conversion through shared memory).
    assert re.search(r"\bmul\.rn\.f32", ptx) and ".ftz" not in ptx, "no fp32 multiply, or flush to zero"
    assert ("ld.global.v4.b32" in ptx) == aligned and ("st.global.v4.b32" in ptx) == aligned
    assert kernel.metadata.shared == 0, f"{kernel.metadata.shared} bytes of shared memory"
print("compiled")
"""


@pytest.mark.skipif(ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the CUDA cases compile the kernel; a fresh interpreter re-runs the interpreted cases only")
def test_kernel_compiles_for_h100_without_a_gpu():
    """The interpreter accepts programs the GPU compiler rejects: compile the kernel to sm_90
    machine code (Triton ships ptxas) in a process where triton is not interpreted."""
    assert_compiles_for_h100(COMPILE_FOR_H100)


@pytest.mark.skipif(ON_CPU or torch.cuda.is_available(), reason="the kernels are tested in this process")
def test_cpu_cases_in_a_fresh_interpreter():
    """Another test module imported triton compiled before this one: re-run this file in a
    process that switches the interpreter on before importing triton."""
    assert_passes_under_interpreter(__file__)
