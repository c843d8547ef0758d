"""Packed multi-crop forward, subset stochastic depth, activation checkpointing and compile:
each against its plain twin (per-resolution forwards, per-sample drop path, no checkpointing,
eager), forward and gradients, on fresh random inputs with stated tolerances."""
import importlib
import math

import pytest
import torch
from omegaconf import OmegaConf

from fastdino.config import load_config
from fastdino.models import DINOHead, PackedSequences, attention, vit_tiny
from fastdino.models.vit import drop_add_residual_subset, drop_path
from fastdino.parallel import DistEnv, apply_parallelism
from fastdino.ssl import MultiCropWrapper, build_student_teacher
from fastdino.ssl.meta_arch import StudentTeacher

attention_module = importlib.import_module("fastdino.models.attention")

# Crop layouts ([batch, side] per resolution group): the DINO layout in small, a single image,
# an odd number of local crops of a third size, and a single resolution.
LAYOUTS = {
    "globals_and_locals": [(4, 16), (12, 8)],
    "one_image": [(1, 16), (1, 8)],
    "odd_three_sizes": [(2, 16), (3, 8), (5, 12)],
    "single_resolution": [(3, 16)],
}


def tiny_vit(backend="math", **kwargs):
    return vit_tiny(patch_size=4, img_size=[16], depth=2, embed_dim=32, num_heads=4, attn_backend=backend, **kwargs)


def images(layout, dtype=torch.float32):
    return [torch.randn(batch, 3, side, side, dtype=dtype) for batch, side in layout]


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def packed_and_separate(model, batches):
    """(packed output, its grads, per-resolution output, its grads) for the same weights and inputs."""
    weights = torch.randn(sum(len(b) for b in batches), model.embed_dim)
    model.zero_grad()
    packed = model.forward_packed(batches)
    (packed * weights).sum().backward()
    packed_grads = grads(model)
    model.zero_grad()
    separate = torch.cat([model(b) for b in batches])
    (separate * weights).sum().backward()
    return packed, packed_grads, separate, grads(model)


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_forward_matches_per_resolution_fp32(backend, layout):
    torch.manual_seed(0)
    model = tiny_vit(backend).train()  # no drop path: train mode is deterministic
    packed, packed_grads, separate, separate_grads = packed_and_separate(model, images(LAYOUTS[layout]))
    assert packed.shape == separate.shape == (sum(b for b, _ in LAYOUTS[layout]), 32)
    # fp32: only the summation order of a few matmuls differs.
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == separate_grads.keys() and "pos_embed" in packed_grads
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], separate_grads[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_forward_matches_per_resolution_bf16_autocast(backend):
    torch.manual_seed(1)
    model = tiny_vit(backend)
    batches = images(LAYOUTS["odd_three_sizes"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        packed, packed_grads, separate, separate_grads = packed_and_separate(model, batches)
    reference, reference_grads, _, _ = packed_and_separate(model, batches)  # fp32
    # bf16 keeps 8 mantissa bits; after 2 blocks and a LayerNorm (outputs O(1)) both bf16 paths
    # must sit within 0.1 of the fp32 result and of each other; a wrong mask is off by O(1).
    torch.testing.assert_close(packed.float(), separate.float(), atol=0.1, rtol=0)
    torch.testing.assert_close(packed.float(), reference, atol=0.1, rtol=0)
    for name in reference_grads:
        scale = reference_grads[name].abs().max().item()
        torch.testing.assert_close(packed_grads[name].float(), separate_grads[name].float(),
                                   atol=0.1 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_packed_attention_equals_xformers_block_diagonal_mask(backend):
    """The per-group path against xformers' own BlockDiagonalMask, materialised as a dense mask."""
    pack = PackedSequences(((3, 5), (4, 2), (1, 7)))
    q, k, v = (torch.randn(1, 2, pack.total_tokens, 8) for _ in range(3))
    dense = pack.xformers_bias(torch.device("cpu")).materialize((1, 2, pack.total_tokens, pack.total_tokens))
    expected = attention(q, k, v, "math", attn_bias=dense)
    torch.testing.assert_close(attention(q, k, v, backend, attn_bias=pack), expected, atol=1e-6, rtol=1e-5)


def gather_twin(attn, x, pack):
    """The packed attention as it ran before issue 12: each group through `attention`, the group
    outputs concatenated, heads reshaped into channels, then the projection (two copies of the output)."""
    _, tokens, channels = x.shape
    q, k, v = attn.qkv(x).reshape(1, tokens, 3, attn.num_heads, channels // attn.num_heads).permute(2, 0, 3, 1, 4)
    outputs = []
    for (count, length), start in zip(pack.groups, pack.group_starts()):
        group = [t[0, :, start:start + count * length].unflatten(1, (count, length)).transpose(0, 1)
                 for t in (q, k, v)]
        outputs.append(attention(*group, attn.backend, scale=attn.scale).transpose(0, 1).flatten(1, 2))
    out = torch.cat(outputs, dim=1).unsqueeze(0)
    return attn.proj(out.transpose(1, 2).reshape(1, tokens, channels))


def math_twin(attn, x, pack):
    """softmax(q k^T * scale) v written out per sequence, then the projection: shares no code with either path."""
    _, tokens, channels = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x)[0].reshape(tokens, 3, heads, channels // heads)
    outputs = []
    for (count, length), start in zip(pack.groups, pack.group_starts()):
        for i in range(count):
            q, k, v = qkv[start + i * length:start + (i + 1) * length].permute(1, 2, 0, 3)  # [heads, length, D]
            weights = ((q.float() @ k.float().transpose(-2, -1)) * attn.scale).softmax(-1)
            outputs.append((weights @ v.float()).transpose(0, 1).reshape(length, channels))
    return attn.proj(torch.cat(outputs).to(x.dtype)).unsqueeze(0)


def attention_and_grads(attn, x, pack, fn, dtype):
    """(output, input gradient, parameter gradients) of fn(attn, x, pack) under `dtype` autocast (fp32: none)."""
    x = x.detach().clone().requires_grad_()
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = fn(attn, x, pack)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, x.grad, {name: p.grad.clone() for name, p in attn.named_parameters()}


# Groups of awkward sizes; each group's block has >= 15 rows: fewer, and the CPU BLAS switches to
# other kernels for the per-block projection (float rounding instead of bit-identity).
PACKS = {"two_groups": ((3, 17), (5, 9)), "three_groups": ((2, 17), (3, 5), (5, 10)), "one_group": ((4, 9),)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("groups", list(PACKS.values()), ids=list(PACKS))
def test_packed_attention_is_bit_identical_to_the_gather_twin(groups, backend, dtype):
    """The gather-free packed attention (group outputs straight into the projection's rows) against
    the concatenate-then-project path it replaced: output, input and parameter gradients bit-identical
    on the CPU, fp32 and bf16 autocast (same per-row products; the weight gradient is the same GEMM)."""
    torch.manual_seed(0)
    attn = tiny_vit(backend).blocks[0].attn
    pack = PackedSequences(groups)
    x = torch.randn(1, pack.total_tokens, 32)
    fast = attention_and_grads(attn, x, pack, lambda a, x, p: a(x, p), dtype)
    twin = attention_and_grads(attn, x, pack, gather_twin, dtype)
    assert fast[0].dtype == twin[0].dtype == dtype
    assert torch.equal(fast[0], twin[0]) and torch.equal(fast[1], twin[1])
    for name, grad in twin[2].items():
        assert torch.equal(fast[2][name], grad), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_attention_matches_the_math_twin(backend, dtype):
    torch.manual_seed(1)
    attn = tiny_vit(backend).blocks[0].attn
    pack = PackedSequences(PACKS["three_groups"])
    x = torch.randn(1, pack.total_tokens, 32)
    fast = attention_and_grads(attn, x, pack, lambda a, x, p: a(x, p), dtype)
    twin = attention_and_grads(attn, x, pack, math_twin, torch.float32)
    # fp32: only the order of sums differs. bf16 keeps 8 mantissa bits: outputs (O(1)) within
    # 0.05, gradients within 5% of their largest entry, where a wrong mask is off by O(1).
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=0)
    torch.testing.assert_close(fast[0].float(), twin[0], **tol)
    for got, want, name in [(fast[1], twin[1], "x"), *((fast[2][n], g, n) for n, g in twin[2].items())]:
        scale = want.abs().max().item() if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(got.float(), want, atol=tol["atol"] * scale, rtol=tol["rtol"], msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_packed_linear_matches_linear_over_the_concatenation(bias, dtype):
    """Blocks of 1, 7, 13 and 40 rows, one of them not requiring a gradient: forward and gradients
    against F.linear(torch.cat(blocks)). Blocks of a few rows take other BLAS kernels than the
    concatenation's GEMM: fp32 within 1e-6 relative (a few ulps); bf16 within 1 bf16 ulp of the
    largest output (0.4 %); the weight gradient is the same GEMM: bit-identical."""
    torch.manual_seed(2)
    weight = torch.randn(24, 40, requires_grad=True)
    bias_ = torch.randn(24, requires_grad=True) if bias else None
    blocks = [torch.randn(rows, 40, requires_grad=rows != 7) for rows in (1, 7, 13, 40)]
    upstream = torch.randn(61, 24)
    results = []
    for fn in (attention_module.packed_linear, lambda b, w, c: torch.nn.functional.linear(torch.cat(b), w, c)):
        leaves = [t for t in (weight, bias_, *blocks) if t is not None and t.requires_grad]
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fn(blocks, weight, bias_)
        (out.float() * upstream).sum().backward()
        results.append((out, [t.grad for t in leaves]))
    (fast, fast_grads), (twin, twin_grads) = results
    assert fast.dtype == twin.dtype == dtype and blocks[1].grad is None
    assert torch.equal(fast_grads[0], twin_grads[0])  # the weight: one GEMM in both
    relative = 1e-6 if dtype == torch.float32 else 2**-8
    for got, want in [(fast, twin), *zip(fast_grads[1:], twin_grads[1:])]:  # output, bias, blocks
        torch.testing.assert_close(got, want, atol=relative * want.abs().max().item(), rtol=0)


def test_packed_sequences_layout_and_errors():
    pack = PackedSequences(((2, 197), (10, 37)))
    assert pack.total_tokens == 2 * 197 + 10 * 37 and pack.num_sequences == 12
    assert pack.group_starts() == [0, 394]
    with pytest.raises(ValueError, match="groups"):
        PackedSequences(((0, 5),))
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="packed attention"):
        attention(q, q, q, "math", attn_bias=pack)


def xformers_runs_on_cuda() -> bool:
    return torch.cuda.is_available() and attention_module.xformers_unavailable_reason("cuda:0") is None


@pytest.mark.skipif(not xformers_runs_on_cuda(), reason="needs CUDA with working xformers kernels")
def test_packed_xformers_on_cuda_matches_per_resolution():
    torch.manual_seed(0)
    model = tiny_vit("xformers").cuda()
    batches = [b.cuda() for b in images(LAYOUTS["odd_three_sizes"])]
    packed, packed_grads, separate, separate_grads = packed_and_separate(model, batches)
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-4)
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], separate_grads[name], atol=1e-3, rtol=1e-3, msg=name)


def test_multicrop_wrapper_packed_matches_per_resolution_and_keeps_order():
    torch.manual_seed(0)
    backbone = tiny_vit("sdpa")
    head = DINOHead(32, 40, nlayers=2, hidden_dim=16, bottleneck_dim=8)
    crops = [torch.randn(3, 3, 16, 16) for _ in range(2)] + [torch.randn(3, 3, 8, 8) for _ in range(5)]
    packed_net = MultiCropWrapper(backbone, head, packed=True)
    plain_net = MultiCropWrapper(backbone, head, packed=False)
    logits, features = packed_net(crops, return_backbone=True)
    assert logits.shape == (7 * 3, 40) and features.shape == (7 * 3, 32)
    torch.testing.assert_close(logits, plain_net(crops), atol=1e-5, rtol=1e-5)
    # Crop-major rows: rows 3c .. 3c+2 are crop c.
    torch.testing.assert_close(features[5 * 3:6 * 3], backbone(crops[5]), atol=1e-5, rtol=1e-5)
    # The teacher's globals are one resolution: a plain batch.
    torch.testing.assert_close(packed_net(crops[:2]), plain_net(crops[:2]))


# ---------------------------------------------------------------- stochastic depth

def test_stochastic_depth_off_is_exact():
    """p = 0, or eval mode, gives exactly the plain block whatever the implementation."""
    torch.manual_seed(0)
    plain = tiny_vit("sdpa")
    x = images(LAYOUTS["globals_and_locals"])
    for impl in ("subset", "per_sample"):
        dropping = tiny_vit("sdpa", drop_path_rate=0.5, drop_path_impl=impl)
        dropping.load_state_dict(plain.state_dict())
        dropping.eval()
        plain.eval()
        assert torch.equal(dropping.forward_packed(x), plain.forward_packed(x))
        assert torch.equal(dropping(x[0]), plain(x[0]))
    block = plain.blocks[0]  # rate 0 at the first block: exact in train mode too
    plain.train()
    tokens = torch.randn(4, 17, 32)
    assert torch.equal(block(tokens), tokens + block.attn_residual(tokens) + block.mlp_residual(
        tokens + block.attn_residual(tokens)))


def elementwise_branch(calls):
    """A per-sample branch that records the batch it saw: residual = 2 t + 1."""
    def branch(t, pack):
        calls.append((t.shape, pack))
        return 2 * t + 1
    return branch


@pytest.mark.parametrize("pack", [None, PackedSequences(((5, 3), (3, 2), (1, 4)))], ids=["batch", "packed"])
def test_subset_stochastic_depth_is_unbiased_and_runs_only_kept_samples(pack):
    torch.manual_seed(0)
    p, draws = 0.3, 4000
    x = torch.randn(1, pack.total_tokens, 4) if pack else torch.randn(6, 3, 4)
    expected = x + (2 * x + 1)
    calls = []
    outputs = torch.stack([drop_add_residual_subset(x, elementwise_branch(calls), p, pack) for _ in range(draws)])
    mean, std = outputs.mean(0), outputs.std(0)
    # The mean of `draws` independent draws is within 5 standard errors of the expectation
    # (a failure by chance has probability ~1e-6 per element).
    # (Always-kept samples have std 0: float rounding of the mean gets 1e-5 of slack.)
    assert ((mean - expected).abs() <= 5 * std / math.sqrt(draws) + 1e-5 * expected.abs().clamp(min=1)).all()
    # The branch only ever saw the kept samples: on average (1 - p) of each group.
    if pack is None:
        kept = torch.tensor([shape[0] for shape, _ in calls], dtype=torch.float)
        assert abs(kept.mean().item() - 0.7 * 6) < 0.1
    else:
        seen = torch.tensor([[count for count, _ in sub.groups] for _, sub in calls], dtype=torch.float)
        assert all(shape[1] == sub.total_tokens for shape, sub in calls)
        for i, (count, _) in enumerate(pack.groups):
            assert abs(seen[:, i].mean().item() - max(0.7 * count, 1.0)) < 0.1
            assert seen[:, i].min() >= 1 and seen[:, i].max() <= count


def test_subset_stochastic_depth_keeps_or_drops_whole_samples():
    torch.manual_seed(0)
    pack = PackedSequences(((4, 3), (6, 2)))
    x = torch.zeros(1, pack.total_tokens, 2)
    out = drop_add_residual_subset(x, lambda t, sub: torch.ones_like(t), 0.5, pack)[0]
    for (count, length), start in zip(pack.groups, pack.group_starts()):
        per_sample = out[start:start + count * length].unflatten(0, (count, length))
        kept = per_sample[:, 0, 0] > 0
        assert torch.equal(per_sample, kept.float()[:, None, None].expand_as(per_sample) * count / kept.sum())


def test_per_sample_drop_path_with_pack_drops_whole_sequences():
    torch.manual_seed(0)
    pack = PackedSequences(((50, 3), (70, 2)))
    out = drop_path(torch.ones(1, pack.total_tokens, 2), 0.4, True, pack)[0]
    for (count, length), start in zip(pack.groups, pack.group_starts()):
        per_sample = out[start:start + count * length].unflatten(0, (count, length)).flatten(1)
        assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.6).all(1)).all()


@pytest.mark.parametrize("impl", ["subset", "per_sample"])
def test_model_trains_with_stochastic_depth_packed(impl):
    torch.manual_seed(0)
    model = tiny_vit("sdpa", drop_path_rate=0.5, drop_path_impl=impl).train()
    out = model.forward_packed(images(LAYOUTS["odd_three_sizes"]))
    out.square().sum().backward()
    assert out.shape == (10, 32) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                         if p.grad is not None)
    with pytest.raises(ValueError, match="drop_path_impl"):
        tiny_vit(drop_path_impl="fast")


# ---------------------------------------------------------------- class-token readout

def full_readout(model, batches):
    """The class tokens of every block computed at every token (forward_features' path), normed."""
    if len(batches) == 1:
        return model.forward_features(batches[0])[:, 0]
    tokens = [model.prepare_tokens(x) for x in batches]
    pack = PackedSequences(tuple((t.shape[0], t.shape[1]) for t in tokens))
    out = model.run_blocks(torch.cat([t.flatten(0, 1) for t in tokens]).unsqueeze(0), pack).squeeze(0)
    return model.norm(out.index_select(0, pack.class_token_rows(out.device)))


def check_readout_matches_full(model, batches, atol: float, rtol: float, grad_atol: float, grad_rtol: float):
    """The readout (forward / forward_packed) against `full_readout`, same draws (same seed), forward
    and every parameter's gradient."""
    weights = torch.randn(sum(len(b) for b in batches), model.embed_dim, device=batches[0].device)
    results = []
    for readout in (full_readout, lambda m, b: m(b[0]) if len(b) == 1 else m.forward_packed(b)):
        model.zero_grad()
        torch.manual_seed(1)
        out = readout(model, batches)
        (out * weights).sum().backward()
        results.append((out, grads(model)))
    (full, full_grads), (readout_out, readout_grads) = results
    torch.testing.assert_close(readout_out, full, atol=atol, rtol=rtol)
    assert readout_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(readout_grads[name], full_grads[name], atol=grad_atol, rtol=grad_rtol, msg=name)


@pytest.mark.parametrize("drop_path_impl", ["subset", "per_sample"])
@pytest.mark.parametrize("layout", ["globals_and_locals", "odd_three_sizes", "single_resolution", "one_image"])
@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_class_token_readout_matches_the_full_last_block(backend, layout, drop_path_impl):
    """forward / forward_packed compute the last block at the class tokens only: the same outputs
    and gradients as the full last block read at the class tokens, in training with stochastic
    depth (the same draws keep the same samples), fp32, within 1e-5."""
    torch.manual_seed(0)
    model = tiny_vit(backend, drop_path_rate=0.5, drop_path_impl=drop_path_impl).train()
    check_readout_matches_full(model, images(LAYOUTS[layout]), 1e-5, 1e-5, 1e-5, 1e-4)


@pytest.mark.skipif(not xformers_runs_on_cuda(), reason="needs CUDA with working xformers kernels")
@pytest.mark.parametrize("layout", ["globals_and_locals", "odd_three_sizes", "single_resolution"])
def test_class_token_readout_with_xformers_on_cuda_matches_the_full_last_block(layout):
    """The one-kernel class-token attention (a block-diagonal mask of one query per sequence), fp32,
    with subset stochastic depth, against the full last block: within 1e-4 (xformers' fp32 kernels)."""
    torch.manual_seed(0)
    model = tiny_vit("xformers", drop_path_rate=0.5).cuda().train()
    check_readout_matches_full(model, [b.cuda() for b in images(LAYOUTS[layout])], 1e-4, 1e-4, 1e-3, 1e-3)


def test_class_token_readout_runs_the_last_mlp_on_class_tokens_only():
    model = tiny_vit("sdpa").eval()
    rows = []
    model.blocks[-1].mlp.fc1.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1]))
    batches = images(LAYOUTS["globals_and_locals"])
    model.forward_packed(batches)
    model(batches[0])
    assert rows == [(1, 16), (4, 1)]  # 16 class tokens of the pack, then 4 images of one batch


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_class_token_attention_with_a_dense_bias_keeps_its_class_row(backend):
    torch.manual_seed(0)
    attn = tiny_vit(backend).blocks[0].attn
    x, bias = torch.randn(3, 5, 32), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(attn.forward_class_tokens(x, bias), attn(x, bias)[:, :1], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="class-token attention takes a tensor or PackedSequences"):
        attn.forward_class_tokens(x, object())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_packed_class_token_attention_matches_the_full_packed_rows(backend, dtype):
    """Against the full packed attention read at the class tokens: fp32 within 1e-6, bf16 within its
    rounding (2e-2), forward and the gradients of q, k and v."""
    torch.manual_seed(0)
    pack = PackedSequences(((3, 5), (1, 2), (4, 3)))
    q, k, v = (torch.randn(pack.total_tokens, 2, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    rows = pack.class_token_rows()
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    weights = torch.randn(pack.num_sequences, 16, dtype=dtype)
    results = []
    for run in (lambda: torch.cat(attention_module.packed_attention_rows(q, k, v, pack, backend)).index_select(0, rows),
                lambda: attention_module.packed_class_token_attention(q.index_select(0, rows), k, v, pack, backend)):
        q.grad = k.grad = v.grad = None
        out = run()
        (out.float() * weights.float()).sum().backward()
        results.append((out, q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for full, class_only in zip(*results):
        torch.testing.assert_close(class_only, full, **tolerance)
    with pytest.raises(ValueError, match="class-token attention wants"):
        attention_module.packed_class_token_attention(q, k, v, pack, backend)


# ---------------------------------------------------------------- activation checkpointing, compile

@pytest.mark.parametrize("packed", [True, False])
def test_activation_checkpointing_same_outputs_and_grads(packed):
    """With stochastic depth on: the recomputation must redraw the same kept samples."""
    torch.manual_seed(0)
    model = tiny_vit("sdpa", drop_path_rate=0.4)
    batches = images(LAYOUTS["globals_and_locals"])
    results = []
    for checkpointing in (False, True):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(123)
        out = model.forward_packed(batches) if packed else model(batches[0])
        out.square().sum().backward()
        results.append((out, grads(model)))
    (out_plain, grads_plain), (out_ckpt, grads_ckpt) = results
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-6, rtol=1e-6)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-5, rtol=1e-5, msg=name)


def model_config(*overrides):
    return load_config(None, ["model.arch=vit_tiny", "model.depth=1", "model.patch_size=4", "model.img_size=16",
                              "data.global_size=16", "data.local_size=8", "model.out_dim=16",
                              "model.head_hidden_dim=16", "model.head_bottleneck_dim=8", "data.path=x",
                              *overrides]).model


def wrapped_student_teacher(model_cfg) -> StudentTeacher:
    """build_student_teacher, then the wrappers of model_cfg applied as training applies them (one process)."""
    nets = build_student_teacher(model_cfg)
    runner, teacher = apply_parallelism(nets.student, nets.teacher, DistEnv(0, 1, 0), micro_batch=4,
                                        bucket_elements=10**6, betas=(0.9, 0.999), clip_grad=3.0,
                                        activation_checkpointing=model_cfg.activation_checkpointing,
                                        compile=model_cfg.compile)
    return StudentTeacher(runner.module, teacher)


def test_build_student_teacher_options_keep_the_state_dict_keys():
    plain = wrapped_student_teacher(model_config("model.packed_crops=false"))
    fast = wrapped_student_teacher(model_config("model.packed_crops=true", "model.activation_checkpointing=true",
                                                "model.compile=true"))
    assert fast.student.packed and not plain.student.packed
    assert fast.student.backbone.activation_checkpointing and not fast.teacher.backbone.activation_checkpointing
    for a, b in ((plain.student, fast.student), (plain.teacher, fast.teacher), (fast.student, fast.teacher)):
        assert list(a.state_dict()) == list(b.state_dict())
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    assert not any("_orig_mod" in key or "checkpoint" in key for key in fast.student.state_dict())
    with pytest.raises(ValueError, match="drop_path_impl"):
        model_config("model.drop_path_impl=fast")


def test_compiled_blocks_match_eager():
    """2 blocks: the first (no stochastic depth) compiles whole, the second compiles its MLP with
    dynamic shapes (the kept subsets change size). Same seed, same draws: eager and compiled
    agree. About 15-30 s on 2 CPU cores."""
    cfg = model_config("model.compile=true", "model.depth=2", "model.drop_path_rate=0.5", "model.attn_backend=sdpa")
    nets = wrapped_student_teacher(cfg)
    eager = wrapped_student_teacher(OmegaConf.merge(cfg, {"compile": False})).student
    eager.load_state_dict(nets.student.state_dict())
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(3)]
    for step in range(2):  # the second step draws other subset sizes: no recompilation error
        outputs = []
        for net in (eager, nets.student):
            net.zero_grad()
            torch.manual_seed(step)
            out = net(crops)
            out.square().sum().backward()
            outputs.append((out, grads(net)))
        torch.testing.assert_close(outputs[1][0], outputs[0][0], atol=1e-5, rtol=1e-5)
        for name, grad in outputs[0][1].items():
            # Inductor reorders float sums; gradients reach ~1e2 here: 1e-3 relative still catches a wrong graph.
            torch.testing.assert_close(outputs[1][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)
