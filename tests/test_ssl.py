"""DINO loss, EMA, clipping and parameter groups against straightforward references."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdino.ssl import DINOLoss, MultiCropWrapper, ema_update_


def per_pair_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The official DINOLoss.forward, pair by pair."""
    student_views = (student / student_temp).chunk(ncrops)
    teacher_views = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(teacher.shape[0] // (student.shape[0] // ncrops))
    total, pairs = 0.0, 0
    for iq, q in enumerate(teacher_views):
        for v, s in enumerate(student_views):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("batch, ncrops, out_dim", [(1, 2, 7), (3, 4, 64), (4, 10, 33), (2, 3, 1)])
def test_loss_and_gradient_match_per_pair_reference(batch, ncrops, out_dim):
    gen = torch.Generator().manual_seed(batch * 100 + ncrops * 10 + out_dim)
    student = torch.randn(ncrops * batch, out_dim, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(2 * batch, out_dim, generator=gen, dtype=torch.float64) * 3
    loss_fn = DINOLoss(out_dim, ncrops, 0.04, 0.07, 3, 10, impl="torch").double()
    loss_fn.center.normal_(generator=gen)
    center = loss_fn.center.clone()
    epoch = 1
    s1 = student.clone().requires_grad_()
    s2 = student.clone().requires_grad_()
    ours = loss_fn(s1, teacher, epoch)
    ref = per_pair_loss(s2, teacher, center, ncrops, 0.1, loss_fn.teacher_temp(epoch))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-9)
    # centre: EMA of the teacher's batch mean of raw logits
    expected_center = center * 0.9 + teacher.mean(0, keepdim=True) * 0.1
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_loss_is_ln_k_for_uniform_outputs():
    loss_fn = DINOLoss(50, 4, 0.04, 0.04, 0, 10, impl="torch")
    loss = loss_fn(torch.zeros(8, 50), torch.zeros(4, 50), 0)
    assert loss.item() == pytest.approx(math.log(50), rel=1e-6)


def test_loss_extreme_logits_are_finite():
    gen = torch.Generator().manual_seed(0)
    loss_fn = DINOLoss(16, 4, 0.04, 0.04, 0, 10, impl="torch")
    student = (torch.randn(8, 16, generator=gen) * 1e4).requires_grad_()
    loss = loss_fn(student, torch.randn(4, 16, generator=gen) * 1e4, 0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_triton_by_name_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton is runnable")
    from fastdino_kernels import use_triton
    from fastdino_kernels.dino_loss import _dino_loss_fwd_kernel

    if use_triton(_dino_loss_fwd_kernel, torch.device("cpu")):  # the interpreter is switched on only at import
        pytest.skip("triton was imported interpreted in this process (by a kernel test): it can run here")
    loss_fn = DINOLoss(8, 2, 0.04, 0.04, 0, 10, impl="triton")
    with pytest.raises(RuntimeError, match="impl='triton' cannot run here"):
        loss_fn(torch.zeros(4, 8), torch.zeros(4, 8), 0)


def test_teacher_temperature_clamps_past_the_schedule():
    loss_fn = DINOLoss(8, 2, 0.04, 0.07, 2, 3)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(1) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(99) == pytest.approx(0.07)


def small_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3, bias=False))


def test_ema_update_matches_formula():
    teacher, student = small_net(0), small_net(1)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 0.9, impl="torch")
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s, rtol=1e-6, atol=1e-7)
    after_one_update = [p.detach().clone() for p in teacher.parameters()]
    ema_update_(teacher, student, 1.0, impl="torch")
    assert all(torch.equal(t, a) for t, a in zip(teacher.parameters(), after_one_update))  # momentum 1: unchanged
    with pytest.raises(ValueError, match="differ"):
        ema_update_(teacher, nn.Linear(5, 7), 0.9, impl="torch")


def test_multicrop_wrapper_equals_per_crop_forward():
    from fastdino.models import DINOHead, vit_tiny

    torch.manual_seed(0)
    wrapper = MultiCropWrapper(vit_tiny(patch_size=4, img_size=[16], depth=2),
                               DINOHead(192, 32, nlayers=2, hidden_dim=16, bottleneck_dim=8)).eval()
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    packed, features = wrapper(crops, return_backbone=True)
    separate = torch.cat([wrapper.head(wrapper.backbone(c)) for c in crops])
    assert packed.shape == (8, 32) and features.shape == (8, 192)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-5)
    assert set(k.split(".")[0] for k in wrapper.state_dict()) == {"backbone", "head"}
