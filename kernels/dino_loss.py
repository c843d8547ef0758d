"""DINO loss (Caron et al. 2021) as fused Triton kernels.

Student logits S [V*B, K] are crop-major (rows v*B .. v*B+B-1 are crop v, crops 0 and 1
the global views); teacher logits T [NT*B, K] are view-major, teacher view i being the
same image view as student crop i. With u = t - c, a = log2(e)/tau_t and b = log2(e)/tau_s,
q_i = softmax(u_i/tau_t) and the loss is the mean over pairs (i, v), v != i, and images of
-sum_k q_i,k * log_softmax(s_v/tau_s)_k.

For one image, with running maxima M_i of u_i and m_v of s_v, every quantity the loss needs
is a sum over K that can be rescaled when a maximum grows:

    Z_i  = sum_k 2^(a (u_ik - M_i))                     (teacher normaliser)
    L_v  = sum_k 2^(b (s_vk - m_v))                     (student normaliser)
    W_iv = sum_k 2^(a (u_ik - M_i)) * (s_vk - m_v)      (teacher-weighted student logits)
    loss_iv = ln2 * (log2 L_v - b W_iv / Z_i)           (every term >= 0, no cancellation)

so the forward is ONE streaming pass over S and T. Maxima are subtracted before scaling by
1/tau (and every exponential is one exp2), so logits of magnitude 1e4 lose nothing to the
rounding of s/tau at magnitude 1e5.

Passes (see bench/kernels.md for the bytes):
  forward  `_dino_loss_fwd_kernel`: grid (K-chunk, image group); a program walks the images
           of its group and, for each, streams the tiles of its chunk for all V crops and
           NT teacher views (each teacher tile read once per image), writing the chunk's
           (M, Z, m, L, W) state and the group's teacher column sums.
           `_dino_loss_fwd_finalize_kernel`: merges the chunk states of each image into
           its loss and the per-row (max, log2 normaliser) pairs (the only thing backward
           keeps), and sums the groups' column sums.
  backward `_dino_loss_bwd_kernel`: grid (K-chunk, image); recomputes q and p from the
           saved row statistics and writes dL/ds = (n_v*p_v - sum_{i!=v} q_i) / tau_s
           * grad / (B * n_pairs), n_v being the number of teacher views paired with crop v.
Column sums and chunk merges are fixed-order reductions: results are deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastdino_kernels import use_triton

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# The finalize kernel holds all chunk states of one image in registers (106 per thread at 128).
MAX_FWD_CHUNKS = 128


@triton.jit
def _dino_loss_fwd_kernel(
    S,  # [V*B, K] student logits, crop-major
    T,  # [NT*B, K] teacher logits, view-major
    C,  # [K] fp32 centre
    STATE,  # [B, n_chunks, 2*NT + 2*V + NT*V] fp32 out: (M, Z, m, L, W) of each image and chunk
    COLSUM,  # [n_groups, K] fp32 out: teacher column sums over the images of each group
    B,
    K,
    n_chunks,
    chunk_len,  # columns per chunk, a multiple of BLOCK_K
    n_groups,
    s_scale,  # log2(e) / tau_s
    t_scale,  # log2(e) / tau_t
    V: tl.constexpr,
    NT: tl.constexpr,
    V_PAD: tl.constexpr,
    NT_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    k_lo = chunk * chunk_len
    k_hi = tl.minimum(k_lo + chunk_len, K)
    v = tl.arange(0, V_PAD)
    i = tl.arange(0, NT_PAD)
    v_ok = v < V
    for b in range(group, B, n_groups):
        s_row = (v * B + b).to(tl.int64) * K
        M = tl.full([NT_PAD], float("-inf"), tl.float32)
        Z = tl.zeros([NT_PAD], tl.float32)
        W = tl.zeros([NT_PAD, V_PAD], tl.float32)
        m = tl.full([V_PAD], float("-inf"), tl.float32)
        L = tl.zeros([V_PAD], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_ok = cols < k_hi
            # Padding crops load zeros: finite statistics that are never stored.
            s = tl.load(S + s_row[:, None] + cols[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            s = tl.where(k_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            d = s - m_new[:, None]
            L = L * tl.exp2((m - m_new) * s_scale) + tl.sum(tl.exp2(d * s_scale), axis=1)
            d = tl.where(k_ok[None, :], d, 0.0)
            # W is measured from m: moving to m_new adds Z * (m - m_new). Before the first
            # tile m = -inf while Z = W = 0, so the shift is 0 rather than 0 * inf.
            shift = tl.where(m > float("-inf"), m - m_new, 0.0)
            m = m_new
            c = tl.load(C + cols, mask=k_ok, other=0.0, eviction_policy="evict_last")
            t_sum = tl.zeros([BLOCK_K], tl.float32)
            for view in tl.static_range(NT):
                t = tl.load(T + (view * B + b).to(tl.int64) * K + cols, mask=k_ok, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                t_sum += t
                u = tl.where(k_ok, t - c, float("-inf"))
                sel = i == view
                M_old = tl.max(tl.where(sel, M, float("-inf")), axis=0)
                Z_old = tl.sum(tl.where(sel, Z, 0.0), axis=0)
                W_old = tl.sum(tl.where(sel[:, None], W, 0.0), axis=0)
                M_new = tl.maximum(M_old, tl.max(u, axis=0))
                alpha = tl.exp2((M_old - M_new) * t_scale)
                e = tl.exp2((u - M_new) * t_scale)
                W_new = alpha * (W_old + Z_old * shift) + tl.sum(e[None, :] * d, axis=1)
                M = tl.where(sel, M_new, M)
                Z = tl.where(sel, alpha * Z_old + tl.sum(e, axis=0), Z)
                W = tl.where(sel[:, None], W_new[None, :], W)
            # The program owns these columns of its group's row: the first image writes,
            # the next ones add (the same thread reads back what it stored). k_prev masks
            # every column for the first image, which has no earlier sum.
            k_prev = tl.where(b == group, k_lo, k_hi)
            prev = tl.load(COLSUM + group * K + cols, mask=cols < k_prev, other=0.0)
            tl.store(COLSUM + group * K + cols, prev + t_sum, mask=k_ok)
        state = STATE + (b * n_chunks + chunk) * (2 * NT + 2 * V + NT * V)
        i_ok = i < NT
        tl.store(state + i, M, mask=i_ok)
        tl.store(state + NT + i, Z, mask=i_ok)
        tl.store(state + 2 * NT + v, m, mask=v_ok)
        tl.store(state + 2 * NT + V + v, L, mask=v_ok)
        tl.store(state + 2 * NT + 2 * V + i[:, None] * V + v[None, :], W, mask=i_ok[:, None] & v_ok[None, :])


@triton.jit
def _dino_loss_fwd_finalize_kernel(
    STATE,  # [B, n_chunks, 2*NT + 2*V + NT*V] fp32: (M, Z, m, L, W) of each image and chunk
    COLSUM,  # [n_groups, K] fp32: teacher column sums of each image group
    LOSS,  # [B] fp32 out: loss terms of each image, already divided by B * n_pairs
    STATS_S,  # [2, V*B] fp32 out: (m, log2 L) of each student row
    STATS_T,  # [2, NT*B] fp32 out: (M, log2 Z) of each teacher row
    TEACHER_SUM,  # [K] fp32 out: column sums of T
    B,
    K,
    n_chunks,
    n_groups,
    s_scale,  # log2(e) / tau_s
    t_scale,  # log2(e) / tau_t
    loss_scale,  # ln(2) / (B * n_pairs)
    V: tl.constexpr,
    NT: tl.constexpr,
    V_PAD: tl.constexpr,
    NT_PAD: tl.constexpr,
    CHUNK_PAD: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < B:
        # Programs [0, B): merge the chunk states of image b (log-sum-exp merge).
        b = pid
        j = tl.arange(0, CHUNK_PAD)
        i = tl.arange(0, NT_PAD)
        v = tl.arange(0, V_PAD)
        j_ok = j < n_chunks
        i_ok = i < NT
        v_ok = v < V
        row = (b * n_chunks + j) * (2 * NT + 2 * V + NT * V)
        ji = row[:, None] + i[None, :]
        ji_ok = j_ok[:, None] & i_ok[None, :]
        jv = row[:, None] + v[None, :]
        jv_ok = j_ok[:, None] & v_ok[None, :]
        # Padding views/crops read 0 (finite, discarded below); padding chunks get -inf
        # maxima so that their weights 2^(M_j - M) vanish.
        M = tl.where(j_ok[:, None], tl.load(STATE + ji, mask=ji_ok, other=0.0), float("-inf"))
        Z = tl.load(STATE + NT + ji, mask=ji_ok, other=0.0)
        m = tl.where(j_ok[:, None], tl.load(STATE + 2 * NT + jv, mask=jv_ok, other=0.0), float("-inf"))
        L = tl.load(STATE + 2 * NT + V + jv, mask=jv_ok, other=0.0)
        W = tl.load(STATE + 2 * NT + 2 * V + row[:, None, None] + i[None, :, None] * V + v[None, None, :],
                    mask=ji_ok[:, :, None] & v_ok[None, None, :], other=0.0)

        M_all = tl.max(M, axis=0)
        alpha = tl.exp2((M - M_all[None, :]) * t_scale)
        Z_all = tl.sum(alpha * Z, axis=0)
        m_all = tl.max(m, axis=0)
        L_all = tl.sum(tl.exp2((m - m_all[None, :]) * s_scale) * L, axis=0)
        shift = tl.where(j_ok[:, None], m - m_all[None, :], 0.0)
        W_all = tl.sum(alpha[:, :, None] * (W + Z[:, :, None] * shift[:, None, :]), axis=0)

        Z_all = tl.where(i_ok, Z_all, 1.0)
        log2_L = tl.log2(tl.where(v_ok, L_all, 1.0))
        pair = i_ok[:, None] & v_ok[None, :] & (i[:, None] != v[None, :])
        terms = tl.where(pair, log2_L[None, :] - s_scale * W_all / Z_all[:, None], 0.0)
        tl.store(LOSS + b, tl.sum(tl.sum(terms, axis=1), axis=0) * loss_scale)
        tl.store(STATS_T + i * B + b, M_all, mask=i_ok)
        tl.store(STATS_T + NT * B + i * B + b, tl.log2(Z_all), mask=i_ok)
        tl.store(STATS_S + v * B + b, m_all, mask=v_ok)
        tl.store(STATS_S + V * B + v * B + b, log2_L, mask=v_ok)
    else:
        # Programs [B, ...): sum the image groups' teacher column sums.
        cols = (pid - B) * BLOCK_C + tl.arange(0, BLOCK_C)
        g = tl.arange(0, GROUP_PAD)
        part = tl.load(COLSUM + g[:, None] * K + cols[None, :], mask=(g < n_groups)[:, None] & (cols < K)[None, :],
                       other=0.0)
        tl.store(TEACHER_SUM + cols, tl.sum(part, axis=0), mask=cols < K)


@triton.jit
def _dino_loss_bwd_kernel(
    S,  # [V*B, K] student logits, crop-major
    T,  # [NT*B, K] teacher logits, view-major
    C,  # [K] fp32 centre
    STATS_S,  # [2, V*B] fp32: (m, log2 L) of each student row
    STATS_T,  # [2, NT*B] fp32: (M, log2 Z) of each teacher row
    GRAD_LOSS,  # [] fp32: upstream gradient of the loss
    DS,  # [V*B, K] out: gradient w.r.t. S, in S's dtype
    B,
    K,
    chunk_len,  # columns per program, a multiple of BLOCK_K
    s_scale,  # log2(e) / tau_s
    t_scale,  # log2(e) / tau_t
    grad_scale,  # 1 / (tau_s * B * n_pairs)
    V: tl.constexpr,
    NT: tl.constexpr,
    V_PAD: tl.constexpr,
    NT_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    k_lo = chunk * chunk_len
    k_hi = tl.minimum(k_lo + chunk_len, K)
    v = tl.arange(0, V_PAD)
    i = tl.arange(0, NT_PAD)
    v_ok = v < V
    s_row = (v * B + b).to(tl.int64) * K
    m_s = tl.load(STATS_S + v * B + b, mask=v_ok, other=0.0)
    log2_L = tl.load(STATS_S + V * B + v * B + b, mask=v_ok, other=0.0)
    M_t = tl.load(STATS_T + i * B + b, mask=i < NT, other=0.0)
    log2_Z = tl.load(STATS_T + NT * B + i * B + b, mask=i < NT, other=0.0)
    # Crop v < NT is itself a teacher view and skips that pair.
    n_paired = NT - (v < NT).to(tl.float32)
    coef = tl.load(GRAD_LOSS) * grad_scale
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < k_hi
        mask = v_ok[:, None] & k_ok[None, :]
        c = tl.load(C + cols, mask=k_ok, other=0.0, eviction_policy="evict_last")
        # Masked lanes load -inf so that their probabilities are 0, not overflowing.
        q_paired = tl.zeros([V_PAD, BLOCK_K], tl.float32)
        for view in tl.static_range(NT):
            t = tl.load(T + (view * B + b).to(tl.int64) * K + cols, mask=k_ok, other=float("-inf"),
                        eviction_policy="evict_first").to(tl.float32)
            sel = i == view
            M_i = tl.sum(tl.where(sel, M_t, 0.0), axis=0)
            q = tl.exp2((t - c - M_i) * t_scale - tl.sum(tl.where(sel, log2_Z, 0.0), axis=0))
            q_paired += tl.where(v[:, None] != view, q[None, :], 0.0)
        s = tl.load(S + s_row[:, None] + cols[None, :], mask=mask, other=float("-inf"),
                    eviction_policy="evict_first").to(tl.float32)
        p = tl.exp2((s - m_s[:, None]) * s_scale - log2_L[:, None])
        grad = (n_paired[:, None] * p - q_paired) * coef
        tl.store(DS + s_row[:, None] + cols[None, :], grad.to(DS.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class DinoLossConfig:
    """Launch shape of the kernels; `dino_loss_config` picks it from the problem size."""

    block_k: int  # columns per tile, a power of two
    fwd_chunk_tiles: int  # forward: tiles per K-chunk; one program per (chunk, image group)
    fwd_groups: int  # forward: image groups; a program walks its group's images in turn
    bwd_chunk_tiles: int  # backward: tiles per program; one program per (chunk, image)
    num_warps: int = 4


def dino_loss_config(batch: int, n_crops: int, n_teacher: int, K: int, device: torch.device, *,
                     num_sms: int | None = None) -> DinoLossConfig:
    """Default launch shape.

    GPU: a tile holds all crops of one image, about 4096 values, with 4 warps. For sm_90
    ptxas gives the forward 96-128 registers per thread (4-5 programs per SM, 35-64 KB of
    loads in flight per SM) and the backward 40-90 (see bench/kernels.md), so the forward
    launches at most 4 programs per SM, all resident at once, split over K-chunks (each costs
    B * (2*NT + 2*V + NT*V) * 4 bytes of state) and image groups (each costs K * 4 bytes of
    column sums) so as to balance the two. The backward has no such costs: about 8 programs
    per SM. The interpreter prefers few, wide tiles.

    num_sms: SMs of the target GPU, instead of asking `device`; given, the GPU shape is
    returned whatever the device (bench/kernel_report.py compiles for an H100 without one).
    """
    rows = triton.next_power_of_2(n_crops)
    if num_sms is not None or device.type == "cuda":
        sms = num_sms if num_sms is not None else torch.cuda.get_device_properties(device).multi_processor_count
        block_k, min_block_k = min(2048, max(128, 4096 // rows)), 256
        fwd_programs, bwd_programs = 4 * sms, 8 * sms
    else:
        block_k = min_block_k = min(4096, max(64, 32768 // rows))
        fwd_programs = bwd_programs = 1
    state_floats = 2 * n_teacher + 2 * n_crops + n_teacher * n_crops
    groups = min(batch, max(1, round(math.sqrt(fwd_programs * batch * state_floats / K))))
    chunks = min(MAX_FWD_CHUNKS, triton.cdiv(fwd_programs, groups))
    while block_k > min_block_k and triton.cdiv(K, block_k) < chunks:
        block_k //= 2  # enough tiles for the chunks
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    n_tiles = triton.cdiv(K, block_k)
    fwd_chunk_tiles = triton.cdiv(n_tiles, min(chunks, n_tiles))
    n_chunks = triton.cdiv(n_tiles, fwd_chunk_tiles)
    bwd_chunks = min(n_tiles, triton.cdiv(bwd_programs, batch))
    return DinoLossConfig(block_k=block_k, fwd_chunk_tiles=fwd_chunk_tiles,
                          fwd_groups=min(batch, max(1, fwd_programs // n_chunks)),
                          bwd_chunk_tiles=triton.cdiv(n_tiles, bwd_chunks))


def _views(student: torch.Tensor, teacher: torch.Tensor, n_teacher: int) -> tuple[int, int]:
    """(batch, n_crops) from the row counts."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[1] != teacher.shape[1]:
        raise ValueError(f"dino_loss: expected [n_crops*B, K] and [n_teacher*B, K] logits, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if n_teacher < 1 or teacher.shape[0] % n_teacher or teacher.shape[0] == 0:
        raise ValueError(f"dino_loss: {teacher.shape[0]} teacher rows do not split into {n_teacher} views")
    batch = teacher.shape[0] // n_teacher
    if student.shape[0] % batch or student.shape[0] == 0:
        raise ValueError(f"dino_loss: {student.shape[0]} student rows are not a multiple of the batch {batch}")
    return batch, student.shape[0] // batch


def _n_pairs(n_teacher: int, n_crops: int) -> int:
    return n_teacher * n_crops - min(n_teacher, n_crops)


def _dino_loss_forward(student, teacher, center, student_temp, teacher_temp, n_teacher, config):
    """-> (loss [], teacher_sum [K], stats_s [2, V*B], stats_t [2, NT*B]); inputs contiguous, centre fp32 [K]."""
    batch, n_crops = _views(student, teacher, n_teacher)
    K = student.shape[1]
    device = student.device
    n_chunks = triton.cdiv(triton.cdiv(K, config.block_k), config.fwd_chunk_tiles)
    if n_chunks > MAX_FWD_CHUNKS:
        raise ValueError(f"dino_loss: {n_chunks} forward chunks, at most {MAX_FWD_CHUNKS}: raise fwd_chunk_tiles")
    groups = min(batch, config.fwd_groups)
    v_pad, nt_pad = triton.next_power_of_2(n_crops), triton.next_power_of_2(n_teacher)
    f32 = dict(dtype=torch.float32, device=device)
    state = torch.empty((batch, n_chunks, 2 * n_teacher + 2 * n_crops + n_teacher * n_crops), **f32)
    colsum = torch.empty((groups, K), **f32)
    _dino_loss_fwd_kernel[(n_chunks, groups)](
        student, teacher, center, state, colsum,
        batch, K, n_chunks, config.fwd_chunk_tiles * config.block_k, groups,
        LOG2E / student_temp, LOG2E / teacher_temp,
        V=n_crops, NT=n_teacher, V_PAD=v_pad, NT_PAD=nt_pad, BLOCK_K=config.block_k,
        num_warps=config.num_warps, enable_fp_fusion=True,
    )
    loss_per_image = torch.empty(batch, **f32)
    stats_s = torch.empty((2, n_crops * batch), **f32)
    stats_t = torch.empty((2, n_teacher * batch), **f32)
    teacher_sum = torch.empty(K, **f32)
    group_pad = triton.next_power_of_2(groups)
    block_c = min(max(16, triton.next_power_of_2(K)), max(32, 4096 // group_pad))
    _dino_loss_fwd_finalize_kernel[(batch + triton.cdiv(K, block_c),)](
        state, colsum, loss_per_image, stats_s, stats_t, teacher_sum,
        batch, K, n_chunks, groups, LOG2E / student_temp, LOG2E / teacher_temp,
        LN2 / (batch * _n_pairs(n_teacher, n_crops)),
        V=n_crops, NT=n_teacher, V_PAD=v_pad, NT_PAD=nt_pad, CHUNK_PAD=triton.next_power_of_2(n_chunks),
        GROUP_PAD=group_pad, BLOCK_C=block_c, num_warps=4, enable_fp_fusion=True,
    )
    return loss_per_image.sum(), teacher_sum, stats_s, stats_t


def _dino_loss_backward(grad_loss, student, teacher, center, stats_s, stats_t, student_temp, teacher_temp, n_teacher,
                        config):
    """-> dL/dS [V*B, K] in S's dtype."""
    batch, n_crops = _views(student, teacher, n_teacher)
    K = student.shape[1]
    grad = torch.empty_like(student)
    n_chunks = triton.cdiv(triton.cdiv(K, config.block_k), config.bwd_chunk_tiles)
    _dino_loss_bwd_kernel[(n_chunks, batch)](
        student, teacher, center, stats_s, stats_t, grad_loss.detach().to(torch.float32).contiguous(), grad,
        batch, K, config.bwd_chunk_tiles * config.block_k,
        LOG2E / student_temp, LOG2E / teacher_temp,
        1.0 / (student_temp * batch * _n_pairs(n_teacher, n_crops)),
        V=n_crops, NT=n_teacher, V_PAD=triton.next_power_of_2(n_crops), NT_PAD=triton.next_power_of_2(n_teacher),
        BLOCK_K=config.block_k, num_warps=config.num_warps, enable_fp_fusion=True,
    )
    return grad


class _DinoLossFunction(torch.autograd.Function):
    """Differentiable w.r.t. the student logits; keeps only 8*(V+NT)*B bytes of row statistics."""

    @staticmethod
    def forward(ctx, student, teacher, center, student_temp, teacher_temp, n_teacher, config):
        loss, teacher_sum, stats_s, stats_t = _dino_loss_forward(student, teacher, center, student_temp,
                                                                 teacher_temp, n_teacher, config)
        ctx.save_for_backward(student, teacher, center, stats_s, stats_t)
        ctx.args = (student_temp, teacher_temp, n_teacher, config)
        ctx.mark_non_differentiable(teacher_sum)
        return loss, teacher_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_teacher_sum):
        student, teacher, center, stats_s, stats_t = ctx.saved_tensors
        grad = _dino_loss_backward(grad_loss, student, teacher, center, stats_s, stats_t, *ctx.args)
        return grad, None, None, None, None, None, None


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor) -> None:
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dino_loss: {name} must be fp32, bf16 or fp16, got {x.dtype}")
    if teacher.device != student.device or center.device != student.device:
        raise ValueError("dino_loss: student, teacher and centre must be on one device")
    if center.numel() != student.shape[1]:
        raise ValueError(f"dino_loss: centre has {center.numel()} entries for K = {student.shape[1]}")


def dino_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: float, *, n_teacher_views: int = 2,
              config: DinoLossConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DINO loss with the Triton kernels; raises where they cannot run (see `use_triton`):
    callers choose `dino_loss_reference` there, never by silent fallback.

    student_logits [n_crops*B, K] (crop-major; crops 0..n_teacher_views-1 are the teacher's
    views), teacher_logits [n_teacher_views*B, K], center [K] (or [1, K]); fp32, bf16 or fp16.
    Returns (loss: 0-d fp32, teacher_sum: [K] fp32 column sums of the raw teacher logits).
    Differentiable w.r.t. student_logits only; the gradient has the student's dtype.
    """
    _check_inputs(student_logits, teacher_logits, center)
    batch, n_crops = _views(student_logits, teacher_logits, n_teacher_views)
    if not use_triton(_dino_loss_fwd_kernel, student_logits.device):
        raise RuntimeError(f"dino_loss: the Triton kernel cannot run on {student_logits.device.type} tensors here "
                           "(CUDA, or CPU with TRITON_INTERPRET=1 set before triton is imported); "
                           "use dino_loss_reference")
    if config is None:
        config = dino_loss_config(batch, n_crops, n_teacher_views, student_logits.shape[1], student_logits.device)
    student = student_logits.contiguous()
    teacher = teacher_logits.detach().contiguous()
    # A copy, never a view of the caller's centre: backward reads it, and DINOLoss updates its
    # centre buffer in place between this forward and the backward (K * 4 bytes, negligible).
    center = center.detach().reshape(-1).to(torch.float32, copy=True).contiguous()
    if torch.is_grad_enabled() and student.requires_grad:
        return _DinoLossFunction.apply(student, teacher, center, student_temp, teacher_temp, n_teacher_views, config)
    loss, teacher_sum, _, _ = _dino_loss_forward(student.detach(), teacher, center, student_temp, teacher_temp,
                                                 n_teacher_views, config)
    return loss, teacher_sum


def dino_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                        student_temp: float, teacher_temp: float, *,
                        n_teacher_views: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of `dino_loss`, computed in fp32 (fp64 for fp64 inputs).

    Uses Q_v = sum_{i != v} q_i so that every pair costs one product with log_softmax.
    """
    batch, n_crops = _views(student_logits, teacher_logits, n_teacher_views)
    K = student_logits.shape[1]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1).view(n_crops, batch, K)
    teacher = teacher_logits.detach().to(dtype)
    q = F.softmax((teacher - center.detach().reshape(-1).to(dtype)) / teacher_temp, dim=-1)
    q = q.view(n_teacher_views, batch, K)
    q_paired = q.sum(0).expand(n_crops, batch, K).clone()
    own = min(n_teacher_views, n_crops)
    q_paired[:own] -= q[:own]
    loss = -(q_paired * log_p).sum() / (batch * _n_pairs(n_teacher_views, n_crops))
    return loss, teacher.sum(0)


def dino_loss_official_eager(student_logits: torch.Tensor, teacher_logits: torch.Tensor, center: torch.Tensor,
                             student_temp: float, teacher_temp: float, *,
                             n_teacher_views: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The official facebookresearch/dino DINOLoss arithmetic, pair by pair in the inputs' dtype
    (the benchmark baseline)."""
    batch, n_crops = _views(student_logits, teacher_logits, n_teacher_views)
    student_out = (student_logits / student_temp).chunk(n_crops)
    teacher_out = F.softmax((teacher_logits - center.reshape(1, -1)) / teacher_temp, dim=-1).detach()
    teacher_out = teacher_out.chunk(n_teacher_views)
    total_loss = 0
    n_loss_terms = 0
    for iq, q in enumerate(teacher_out):
        for v in range(n_crops):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    return total_loss.float(), teacher_logits.detach().sum(0, dtype=torch.float32)
