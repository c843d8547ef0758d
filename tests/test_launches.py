"""No needless copies or launches (issue 12, item 3), counted and checked on the CPU.

- Packed attention, SDPA path: one block's forward makes no copy to gather the resolution groups
  (aten ops counted with a TorchDispatchMode), and its backward a fixed number of copies whatever
  the number of groups, with no zero-filled full-size gradient per group (what indexing the token
  axis cost before). Numerics against the twins: tests/test_packed.py.
- DINOAdamW: the AdamW implementation is chosen once at construction (fused where every parameter
  is a floating-point CUDA tensor, torch's default elsewhere) and logged; the fused kernel honours
  the frozen-group switch (torch's CPU fused kernel here, CUDA's where a GPU exists); a checkpoint
  of another implementation resumes on this one.
- Per-parameter clipping equals the official loop, on whole gradients and on ZeRO fragments.
"""
import logging
from types import SimpleNamespace

import pytest
import torch

from fastdino.models import DINOHead, PackedSequences, attention, vit_tiny
from fastdino.parallel import DINOAdamW
from fastdino.parallel.optim import PartitionFragments, adamw_impl
from fastdino.ssl import param_groups
from op_count import CountOps

# aten ops that write a copy of their input(s).
COPIES = {"cat", "stack", "clone", "copy_", "_to_copy", "contiguous", "index_select", "index_put"}
# Backward ops that materialise a zero-filled gradient of the whole input for a part of it.
ZERO_FILLED = {"select_backward", "slice_backward", "index_put_"}


def tiny_block():
    torch.manual_seed(0)
    return vit_tiny(patch_size=4, img_size=[16], depth=1, embed_dim=32, num_heads=4, attn_backend="sdpa").blocks[0]


@pytest.mark.parametrize("groups", [((4, 17), (8, 5)), ((2, 17), (3, 5), (5, 10))], ids=["2_groups", "3_groups"])
def test_packed_block_gathers_the_groups_without_copies(groups):
    """fp32 (under autocast the casts of the projection weights appear, as F.linear casts them)."""
    block, pack = tiny_block(), PackedSequences(groups)
    x = torch.randn(1, pack.total_tokens, 32, requires_grad=True)
    with CountOps() as forward:
        y = block(x, pack)
    assert forward.ops["_scaled_dot_product_flash_attention_for_cpu"] == len(groups)  # the SDPA path ran
    assert forward.only(COPIES) == {}
    with CountOps() as backward:
        y.backward(torch.randn_like(y))
    assert backward.only(ZERO_FILLED) == {}
    # q, k and v: one concatenation each of their groups' gradients (split's backward), then one
    # stack into the qkv layout (unbind's); one concatenation of the attention output for the
    # projection's weight gradient (the GEMM F.linear's backward runs, so bit-identical).
    assert backward.only(COPIES) == {"cat": 4, "stack": 1}


def test_the_gather_path_it_replaced_copies_and_the_counter_sees_it():
    """The counter is not blind: the generic packed `attention` (one tensor out) concatenates."""
    pack = PackedSequences(((4, 17), (8, 5)))
    # Token-major q/k/v as the model's qkv projection gives them (a head-major layout makes SDPA copy its inputs).
    q, k, v = (torch.randn(1, pack.total_tokens, 4, 8).transpose(1, 2) for _ in range(3))
    with CountOps() as counted:
        attention(q, k, v, "sdpa", attn_bias=pack)
    assert counted.only(COPIES) == {"cat": 1}


# ---------------------------------------------------------------- AdamW implementation

def fake_params(device: str, dtype=torch.float32):
    """Stand-ins with the attributes the choice reads (no GPU needed to test the decision)."""
    return [SimpleNamespace(device=torch.device(device), dtype=dtype,
                            is_floating_point=lambda: dtype.is_floating_point)] * 3


def test_adamw_impl_choice():
    assert adamw_impl("auto", fake_params("cuda"))[0] == "fused"
    assert adamw_impl("auto", fake_params("cpu"))[0] == "fused"  # torch has a CPU fused kernel
    assert adamw_impl("auto", fake_params("cuda") + fake_params("cpu"))[0] == "fused"
    impl, why = adamw_impl("auto", fake_params("cuda", torch.int64))
    assert impl == "foreach" and why == "torch has no fused kernel for torch.int64 parameters on cuda"
    assert adamw_impl("auto", fake_params("meta"))[0] == "for_loop"  # neither fused nor foreach kernels
    for name in ("fused", "foreach", "for_loop"):
        assert adamw_impl(name, [torch.zeros(2)]) == (name, "asked for")  # torch has a CPU fused kernel
    with pytest.raises(ValueError, match="impl 'fused' cannot run.*torch.int64"):
        adamw_impl("fused", [torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="unknown AdamW implementation 'fast'"):
        adamw_impl("fast", [])


def test_dino_adamw_on_cpu_runs_the_fused_update_and_logs_it(caplog):
    model = torch.nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="fastdino.parallel.optim"):
        optimizer = DINOAdamW(model.parameters(), lr=0.1, clip_grad=1.0)
    assert optimizer.impl == "fused"
    assert all(g["fused"] is True and g["foreach"] is False for g in optimizer.param_groups)
    assert "AdamW fused on cpu" in caplog.text
    with pytest.raises(TypeError, match="impl="):
        DINOAdamW(model.parameters(), lr=0.1, clip_grad=1.0, fused=True)


def head_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    model.add_module("head", DINOHead(5, 11, hidden_dim=9, bottleneck_dim=3))
    return model


def train_with_frozen_last_layer(impl: str, device: str, steps: int = 6, frozen_steps: int = 3):
    """(initial weights, weights after `frozen_steps`, final weights, optimizer) of DINOAdamW over
    seeded random gradients, the last layer frozen for the first `frozen_steps` steps."""
    model = head_model().to(device)
    optimizer = DINOAdamW(param_groups(model), lr=0.0, clip_grad=0.5, impl=impl)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group in optimizer.param_groups:
            group.update(lr=0.01 * (step + 1), weight_decay=0.04 if group["decay"] else 0.0,
                         frozen=step < frozen_steps and group["last_layer"])
        for p in model.parameters():
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=generator) * (3.0 if step % 2 else 0.1)).to(device)
        optimizer.step()
        if step == frozen_steps - 1:
            after_frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    return initial, after_frozen if frozen_steps else initial, dict(model.named_parameters()), optimizer


def check_fused_matches(default_impl: str, device: str, tolerance: dict):
    initial, frozen, final, fused = train_with_frozen_last_layer("fused", device)
    _, _, reference, _ = train_with_frozen_last_layer(default_impl, device)
    assert fused.impl == "fused" and all(g["fused"] for g in fused.param_groups)
    last_layer = [n for n in final if "last_layer" in n and final[n].requires_grad]
    assert last_layer
    for name in last_layer:
        assert torch.equal(frozen[name], initial[name]), name  # frozen: untouched, bit for bit
        # ...and AdamW started its moments and step count only when the layer thawed
        assert fused.state[final[name]]["step"].item() == 3, name
    for name, p in final.items():
        torch.testing.assert_close(p, reference[name], msg=name, **tolerance)


def test_fused_update_honours_frozen_groups_on_cpu():
    """torch's CPU fused kernel under DINOAdamW's group switch, against the for-loop update:
    6 steps, 3 of them frozen. The two order the fp32 arithmetic differently: within 1e-6."""
    check_fused_matches("for_loop", "cpu", dict(atol=1e-6, rtol=1e-6))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_foreach_on_cuda_with_a_frozen_group():
    """What "auto" runs on CUDA (fused) against torch's CUDA default (foreach), 6 steps, 3 frozen:
    both fp32; weights of O(1) within 1e-6 (a few ulps of different operation order per step)."""
    assert adamw_impl("auto", [torch.zeros(1, device="cuda")])[0] == "fused"
    check_fused_matches("foreach", "cuda", dict(atol=1e-6, rtol=1e-6))


@pytest.mark.parametrize("saved, resumed", [("fused", "for_loop"), ("for_loop", "fused")])
def test_a_checkpoint_of_another_update_resumes_on_this_one(saved, resumed):
    *_, writer = train_with_frozen_last_layer(saved, "cpu", steps=2, frozen_steps=0)
    model = head_model()
    optimizer = DINOAdamW(param_groups(model), lr=0.01, clip_grad=0.5, impl=resumed)
    optimizer.load_state_dict(writer.state_dict())
    assert all(g["fused"] is (resumed == "fused") and g["foreach"] is False for g in optimizer.param_groups)
    steps = [s["step"] for s in optimizer.state.values()]
    assert steps and all(s.dtype == torch.float32 and s.device.type == "cpu" and s.item() == 2 for s in steps)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(s["step"].item() == 3 for s in optimizer.state.values())


# ---------------------------------------------------------------- per-parameter clipping

def official_clip_(grads: list[torch.Tensor], clip: float) -> None:
    """main_dino.py's utils.clip_gradients, one parameter at a time."""
    for g in grads:
        coef = clip / (g.norm(2) + 1e-6)
        if coef < 1:
            g.mul_(coef)


# Awkward shapes: a scalar, one element, odd sizes, a zero gradient (norm 0: left alone).
SHAPES = [(), (1,), (7, 3), (5,), (2, 3, 4), (13,), (1, 1)]


def random_grads(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    scales = (5, 0.1, 3, 1e-3, 2, 40, 1)
    grads = [torch.randn(shape, generator=generator) * scale for shape, scale in zip(SHAPES, scales)]
    grads[3].zero_()
    return grads


def test_clipping_equals_the_official_loop():
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    no_grad = torch.nn.Parameter(torch.zeros(4))  # left alone: no gradient this step
    optimizer = DINOAdamW([{"params": params[:4] + [no_grad]}, {"params": params[4:]}], lr=0.0, clip_grad=0.7)
    grads = random_grads(0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    official_clip_(grads, 0.7)
    optimizer.step()
    assert no_grad.grad is None
    for p, want in zip(params, grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)
    assert any(not torch.equal(p.grad, g) for p, g in zip(params, random_grads(0)))  # clipping acted


def test_clipping_of_zero_fragments_equals_the_official_loop(one_rank_group):
    """DeepSpeed ZeRO 1/2 hands the optimizer one flat fp32 partition per group; the parameters
    lie in it as fragments. One rank: every fragment is a whole parameter (2 ranks, where
    parameters are split: tests/test_parallel.py)."""
    numels = [torch.Size(shape).numel() for shape in SHAPES]
    flat = torch.zeros(sum(numels) + 3)  # ZeRO pads the flat buffer
    bit16 = list(torch.split(flat, numels + [3]))[:-1]
    fragments = PartitionFragments(bit16, flat, flat, one_rank_group)
    partition = torch.nn.Parameter(torch.zeros_like(flat))
    optimizer = DINOAdamW([partition], lr=0.0, clip_grad=0.7)
    optimizer.partition_fragments[id(partition)] = fragments
    grads = random_grads(1)
    partition.grad = torch.cat([g.flatten() for g in grads] + [torch.full((3,), 9.0)])
    official_clip_(grads, 0.7)
    optimizer.step()
    torch.testing.assert_close(partition.grad[:-3], torch.cat([g.flatten() for g in grads]), rtol=1e-6, atol=0)
    assert torch.equal(partition.grad[-3:], torch.full((3,), 9.0))  # padding: no parameter's, untouched
