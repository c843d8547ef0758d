"""ViT, DINOHead and attention backends: official checkpoint layout, numerics against
plain re-implementations, backend selection."""
import importlib
import logging
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdino import models
from fastdino.models import DINOHead, VisionTransformer, attention, resolve_attention_backend
from fastdino.models.vit import drop_path

# `fastdino.models.attention` is the function (the package exports it); this is the module.
attention_module = importlib.import_module("fastdino.models.attention")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- official layout
# Read off facebookresearch/dino vision_transformer.py: the parameters each module registers,
# in registration order (own parameters first, then submodules).

def official_vit_shapes(dim: int, depth: int = 12, patch: int = 16, img: int = 224, in_chans: int = 3,
                        mlp_ratio: int = 4) -> dict[str, tuple]:
    hidden = dim * mlp_ratio
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, (img // patch) ** 2 + 1, dim),
              "patch_embed.proj.weight": (dim, in_chans, patch, patch), "patch_embed.proj.bias": (dim,)}
    block = {"norm1.weight": (dim,), "norm1.bias": (dim,),
             "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
             "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
             "norm2.weight": (dim,), "norm2.bias": (dim,),
             "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
             "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,)}
    for i in range(depth):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


def shapes_of(module: nn.Module) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.mark.parametrize("patch", [8, 16])
@pytest.mark.parametrize("arch,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
def test_vit_state_dict_matches_official(arch, dim, patch):
    with torch.device("meta"):  # full-size models, no memory or init time
        model = getattr(models, arch)(patch_size=patch)
    assert list(shapes_of(model).items()) == list(official_vit_shapes(dim, patch=patch).items())
    assert isinstance(model.head, nn.Identity)
    assert model.embed_dim == model.num_features == dim


def test_vit_architecture_hyperparameters():
    for arch, heads in [("vit_tiny", 3), ("vit_small", 6), ("vit_base", 12)]:
        with torch.device("meta"):
            model = getattr(models, arch)()
        assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == heads
        assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6
        assert model.blocks[0].attn.qkv.bias is not None


def test_vit_classifier_head_keys():
    with torch.device("meta"):
        model = models.vit_small(num_classes=10, depth=1)
    assert shapes_of(model)["head.weight"] == (10, 384) and shapes_of(model)["head.bias"] == (10,)


def bn_shapes(prefix: str, n: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,), f"{prefix}.running_mean": (n,),
            f"{prefix}.running_var": (n,), f"{prefix}.num_batches_tracked": ()}


@pytest.mark.parametrize("kwargs,expected", [
    (dict(), {"mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048),
              "mlp.2.bias": (2048,), "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,)}),
    (dict(use_bn=True), {"mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), **bn_shapes("mlp.1", 2048),
                         "mlp.3.weight": (2048, 2048), "mlp.3.bias": (2048,), **bn_shapes("mlp.4", 2048),
                         "mlp.6.weight": (256, 2048), "mlp.6.bias": (256,)}),
    (dict(nlayers=1), {"mlp.weight": (256, 384), "mlp.bias": (256,)}),
    (dict(nlayers=2, hidden_dim=512, bottleneck_dim=128),
     {"mlp.0.weight": (512, 384), "mlp.0.bias": (512,), "mlp.2.weight": (128, 512), "mlp.2.bias": (128,)}),
])
def test_head_state_dict_matches_official(kwargs, expected):
    with torch.device("meta"):
        head = DINOHead(384, 65536, **kwargs)
    bottleneck = kwargs.get("bottleneck_dim", 256)
    expected = {**expected, "last_layer.weight_g": (65536, 1), "last_layer.weight_v": (65536, bottleneck)}
    assert list(shapes_of(head).items()) == list(expected.items())


# ---------------------------------------------------------------- numerics vs plain references

TINY = dict(img_size=[32], patch_size=8, embed_dim=32, depth=2, num_heads=4)


def random_official_state_dict(dim=32, depth=2, patch=8, img=32) -> dict[str, torch.Tensor]:
    """Every tensor random (LayerNorm gains and biases included), so the reference sees them all."""
    return {name: torch.randn(shape) * (0.5 if len(shape) == 1 else 0.1)
            for name, shape in official_vit_shapes(dim, depth, patch, img).items()}


def reference_vit(sd: dict, x: torch.Tensor, num_heads: int, patch: int, pos_embed=None) -> torch.Tensor:
    """Official DINO ViT forward written out from the state_dict, one head at a time."""
    dim = sd["cls_token"].shape[-1]
    head_dim = dim // num_heads
    pos_embed = sd["pos_embed"] if pos_embed is None else pos_embed
    layer_norm = lambda t, prefix: F.layer_norm(t, (dim,), sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)
    linear = lambda t, prefix: t @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]

    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = torch.cat([sd["cls_token"].expand(len(x), -1, -1), patches.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + pos_embed
    depth = len({name.split(".")[1] for name in sd if name.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}"
        q, k, v = linear(layer_norm(tokens, b + ".norm1"), b + ".attn.qkv").split(dim, dim=-1)
        heads = []
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(head_dim), dim=-1)
            heads.append(weights @ v[..., cols])
        tokens = tokens + linear(torch.cat(heads, dim=-1), b + ".attn.proj")
        hidden = F.gelu(linear(layer_norm(tokens, b + ".norm2"), b + ".mlp.fc1"))
        tokens = tokens + linear(hidden, b + ".mlp.fc2")
    return layer_norm(tokens, "norm")[:, 0]


@pytest.mark.parametrize("backend", ["math", "sdpa", "auto"])
def test_official_state_dict_loads_strict_and_forward_matches_reference(backend):
    sd = random_official_state_dict()
    model = models.vit_tiny(**TINY, attn_backend=backend).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), reference_vit(sd, x, num_heads=4, patch=8), atol=1e-5, rtol=1e-5)


def test_interpolated_forward_matches_reference():
    sd = random_official_state_dict()
    model = models.vit_tiny(**TINY).eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 24, 40)  # 3 x 5 patches from a 4 x 4 native grid
    expected = reference_vit(sd, x, num_heads=4, patch=8, pos_embed=model.interpolate_pos_encoding(3, 5))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_pos_embed_native_size_is_identity():
    model = models.vit_tiny(embed_dim=32, num_heads=2, depth=1)
    assert model.interpolate_pos_encoding(14, 14) is model.pos_embed


def test_pos_embed_interpolation_odd_size_keeps_orientation():
    model = models.vit_tiny(embed_dim=32, num_heads=2, depth=1).eval()  # 224 / 16: native 14 x 14
    rows = torch.arange(14.0).view(14, 1).expand(14, 14)
    with torch.no_grad():
        model.pos_embed[0, 0] = 7.0
        model.pos_embed[0, 1:, 0] = rows.flatten()  # channel 0 varies down the rows
        model.pos_embed[0, 1:, 1] = rows.T.flatten()  # channel 1 varies across the columns
        model.pos_embed[0, 1:, 2] = 3.0  # channel 2 constant
    pos = model.interpolate_pos_encoding(3, 5)  # a 48 x 80 image at patch 16
    assert pos.shape == (1, 1 + 3 * 5, 32)
    assert torch.equal(pos[0, 0], model.pos_embed[0, 0])
    grid = pos[0, 1:].reshape(3, 5, 32)
    by_row, by_col = grid[..., 0], grid[..., 1]
    assert torch.allclose(by_row, by_row[:, :1].expand(3, 5)) and (by_row[1:, 0] > by_row[:-1, 0]).all()
    assert torch.allclose(by_col, by_col[:1].expand(3, 5)) and (by_col[0, 1:] > by_col[0, :-1]).all()
    torch.testing.assert_close(grid[..., 2], torch.full((3, 5), 3.0))
    assert model(torch.randn(2, 3, 48, 80)).shape == (2, 32)


def test_head_forward_matches_reference():
    head = DINOHead(32, 50, norm_last_layer=False, hidden_dim=24, bottleneck_dim=16).eval()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    sd = head.state_dict()
    x = torch.randn(5, 32)
    h = F.gelu(x @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    h = F.gelu(h @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    h = h @ sd["mlp.4.weight"].T + sd["mlp.4.bias"]
    h = h / h.norm(dim=-1, keepdim=True)
    v = sd["last_layer.weight_v"]
    weight = sd["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), h @ weight.T, atol=1e-6, rtol=1e-5)


def test_norm_last_layer_freezes_the_gain():
    frozen, free = DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4), DINOHead(16, 10, norm_last_layer=False,
                                                                              hidden_dim=8, bottleneck_dim=4)
    for head in (frozen, free):
        assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1))
        head(torch.randn(3, 16)).square().sum().backward()
        assert head.last_layer.weight_v.grad is not None
    assert not frozen.last_layer.weight_g.requires_grad and frozen.last_layer.weight_g.grad is None
    assert free.last_layer.weight_g.requires_grad and free.last_layer.weight_g.grad is not None
    # With a unit gain every prototype row has unit norm.
    torch.testing.assert_close(frozen.last_layer.weight.norm(dim=1), torch.ones(10))


def test_official_init():
    model = models.vit_small(depth=2)
    head = DINOHead(384, 1000)
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002 and abs(model.cls_token.std().item() - 0.02) < 0.01
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.001 and not qkv.bias.any()
    assert (model.norm.weight == 1).all() and not model.norm.bias.any()
    assert abs(head.mlp[0].weight.std().item() - 0.02) < 0.001 and not head.mlp[0].bias.any()
    # last_layer.weight_v: nn.Linear's default uniform(+-1/sqrt(fan_in)), as official
    bound = 1 / math.sqrt(256)
    v = head.last_layer.weight_v
    assert v.abs().max() <= bound and v.abs().max() > 0.9 * bound


# ---------------------------------------------------------------- model API

def tiny_model(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{**TINY, "qkv_bias": True, "norm_layer": partial(nn.LayerNorm, eps=1e-6),
                                **kwargs}).eval()


def test_forward_features_intermediate_layers_and_cls_agree():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 40)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 4 * 5, 32)
    torch.testing.assert_close(model(x), tokens[:, 0])
    layers = model.get_intermediate_layers(x, n=2)
    assert len(layers) == 2 and layers[0].shape == tokens.shape
    torch.testing.assert_close(layers[-1], tokens)


def test_last_selfattention_shape_rows_and_output_path():
    model = tiny_model()
    x = torch.randn(2, 3, 24, 40)
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 4, 1 + 3 * 5, 1 + 3 * 5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 16))
    # The weights path computes the same block output as the fused one.
    tokens = torch.randn(2, 16, 32)
    fused = model.blocks[0].attn(tokens)
    via_weights, _ = model.blocks[0].attn(tokens, return_weights=True)
    torch.testing.assert_close(via_weights, fused, atol=1e-6, rtol=1e-5)


def test_model_backends_agree_forward_and_backward():
    outputs, grads = [], []
    for backend in ("math", "sdpa"):
        torch.manual_seed(0)
        model = tiny_model(attn_backend=backend)
        y = model(torch.randn(2, 3, 32, 32))
        y.square().sum().backward()
        outputs.append(y)
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- attention backends

def qkv(shape=(2, 3, 17, 16), dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=dtype, device=device) for _ in range(3)]


def test_backends_agree_fp32():
    q, k, v = qkv()
    reference = attention(q, k, v, "math")
    assert reference.shape == q.shape
    torch.testing.assert_close(attention(q, k, v, "sdpa"), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, "auto"), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, "sdpa", scale=0.3), attention(q, k, v, "math", scale=0.3),
                               atol=1e-5, rtol=1e-5)


def test_backends_agree_with_a_mask():
    q, k, v = qkv()
    keep = torch.rand(2, 1, 17, 17) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    reference = attention(q, k, v, "math", attn_bias=additive)
    torch.testing.assert_close(attention(q, k, v, "math", attn_bias=keep), reference)
    torch.testing.assert_close(attention(q, k, v, "sdpa", attn_bias=keep), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, "sdpa", attn_bias=additive), reference, atol=1e-5, rtol=1e-5)


def test_backends_agree_bf16():
    q, k, v = qkv()
    reference = attention(q, k, v, "math")
    low = [t.bfloat16() for t in (q, k, v)]
    # bf16 keeps 8 mantissa bits (~0.4% per rounding); outputs are O(1), so 3e-2 absolute
    # leaves room for the roundings of two matmuls without hiding a wrong result.
    for backend in ("math", "sdpa"):
        out = attention(*low, backend)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=0)


def test_auto_on_cpu_picks_sdpa_and_logs_why_once(caplog):
    attention_module._resolve_auto.cache_clear()
    with caplog.at_level(logging.INFO, logger="fastdino.models.attention"):
        assert resolve_attention_backend("auto", "cpu") == "sdpa"
        assert resolve_attention_backend("auto", torch.device("cpu")) == "sdpa"
        tiny_model()(torch.randn(1, 3, 32, 32))
    messages = [r.getMessage() for r in caplog.records if r.name == "fastdino.models.attention"]
    assert len(messages) == 1
    assert "sdpa" in messages[0] and "cpu" in messages[0]


def test_explicit_xformers_on_cpu_raises_one_line():
    with pytest.raises(RuntimeError, match="xformers") as error:
        resolve_attention_backend("xformers", "cpu")
    assert "\n" not in str(error.value)
    with pytest.raises(RuntimeError, match="xformers"):
        tiny_model(attn_backend="xformers")(torch.randn(1, 3, 32, 32))


def test_concrete_and_unknown_backends():
    assert resolve_attention_backend("sdpa", "cpu") == "sdpa"
    assert resolve_attention_backend("math", "cpu") == "math"
    with pytest.raises(ValueError, match="flash"):
        resolve_attention_backend("flash", "cpu")
    with pytest.raises(ValueError, match="flash"):
        tiny_model(attn_backend="flash")


def xformers_runs_on_cuda() -> bool:
    return torch.cuda.is_available() and attention_module.xformers_unavailable_reason("cuda:0") is None


@pytest.mark.skipif(not xformers_runs_on_cuda(), reason="needs CUDA with working xformers kernels")
def test_xformers_on_cuda_matches_math():
    assert resolve_attention_backend("auto", "cuda:0") == "xformers"
    q, k, v = qkv(shape=(2, 6, 197, 64), device="cuda:0")
    reference = attention(q, k, v, "math")
    torch.testing.assert_close(attention(q, k, v, "xformers"), reference, atol=1e-4, rtol=1e-4)
    low = [t.bfloat16() for t in (q, k, v)]
    torch.testing.assert_close(attention(*low, "xformers").float(), reference, atol=3e-2, rtol=0)
    model = tiny_model(attn_backend="xformers").cuda()
    x = torch.randn(2, 3, 32, 32, device="cuda:0")
    expected = reference_vit(model.state_dict(), x, num_heads=4, patch=8)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- drop path

def test_drop_path_identity_in_eval_or_at_rate_zero():
    x = torch.randn(8, 5, 3)
    assert drop_path(x, 0.5, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    model = tiny_model(drop_path_rate=0.3)
    reference = tiny_model()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


def test_drop_path_rates_grow_with_depth():
    model = tiny_model(depth=3, drop_path_rate=0.2)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    assert [round(b.drop_path.drop_prob, 6) for b in model.blocks[1:]] == [0.1, 0.2]


def test_drop_path_is_per_sample_and_unbiased():
    x = torch.ones(20000, 4, 3)
    out = drop_path(x, 0.3, training=True)
    per_sample = out.flatten(1)
    dropped = (per_sample == 0).all(1)
    kept = torch.isclose(per_sample, torch.full_like(per_sample, 1 / 0.7)).all(1)
    assert (dropped | kept).all()  # a whole sample is dropped or kept, never part of one
    # 20000 samples: the std of the mean is ~0.005 and of the drop fraction ~0.003.
    assert abs(out.mean().item() - 1.0) < 0.03
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
