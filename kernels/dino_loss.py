"""DINO loss (Caron et al. 2021) as fused Triton kernels.

Student logits S [V*B, K] are crop-major (rows v*B .. v*B+B-1 are crop v, crops 0 and 1
the global views); teacher logits T [NT*B, K] are view-major, teacher view i being the
same image view as student crop i. With u = t - c, a = log2(e)/tau_t and b = log2(e)/tau_s,
q_i = softmax(u_i/tau_t) and the loss is the mean over pairs (i, v), v != i, and images of
-sum_k q_i,k * log_softmax(s_v/tau_s)_k. P_i denotes the crops paired with view i.

For one image, with running maxima M_i of u_i and m_v of s_v, every quantity the loss needs
is a sum over K that can be rescaled when a maximum grows:

    Z_i  = sum_k 2^(a (u_ik - M_i))                             (teacher normaliser)
    L_v  = sum_k 2^(b (s_vk - m_v))                             (student normaliser)
    W_i  = sum_k 2^(a (u_ik - M_i)) * sum_{v in P_i} (s_vk - m_v)  (teacher-weighted student logits)
    loss_i = ln2 * (sum_{v in P_i} log2 L_v - b W_i / Z_i)        (every term >= 0, no cancellation)

(M_i -> M_i' scales Z_i and W_i by 2^(a (M_i - M_i')); m_v -> m_v' scales L_v by
2^(b (m_v - m_v')) and adds Z_i (m_v - m_v') to W_i for each view i paired with v), so the
forward is ONE streaming pass over S and T, and partial sums over any column sets merge by the
same rules. Maxima are subtracted before scaling by 1/tau (and every exponential is one exp2),
so logits of magnitude 1e4 lose nothing to the rounding of s/tau at magnitude 1e5.

Passes (see bench/kernels.md for the bytes and the launch shapes):
  forward  `_dino_loss_fwd_kernel`: grid (K-chunk, group of image sets); a program streams the
           tiles of its chunk for IMAGES images side by side (one per warp on the GPU), each
           image as LANES lanes of VEC adjacent columns. Every lane keeps the statistics above
           over its own columns (no exchange between lanes per tile; crops are separate rows,
           none padded); the lanes of an image are merged once, at the end of the chunk, into
           the chunk's (M, Z, W, m, L) state. The program also adds the tile's teacher rows
           of its images to the group's column sums.
           `_dino_loss_fwd_finalize_kernel`: merges the chunk states of each image into
           its loss and the per-row (max, log2 normaliser) pairs (the only thing backward
           keeps), and sums the groups' column sums.
  backward `_dino_loss_bwd_kernel`: grid (K-chunk, image); recomputes q and p from the
           saved row statistics and writes dL/ds = (n_v*p_v - sum_{i!=v} q_i) / tau_s
           * grad / (B * n_pairs), n_v being the number of teacher views paired with crop v.
Column sums and merges (lanes, chunks) are fixed-order reductions: results are deterministic.
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
# The finalize kernel holds all chunk states of one image in registers.
MAX_FWD_CHUNKS = 128
# Running maxima start here, not at -inf: a lane that has seen only masked columns keeps finite
# references, so its rescale factors are 2^(huge negative) = 0 and its shift terms 0 * finite.
# Logits must lie above it.
M_INIT = tl.constexpr(-1e30)
# GPU forward launch shape (see dino_loss_config and bench/kernels.md): columns per lane and
# tile; programs per SM the grid is sized for (ptxas gives the forward 48-69 registers per
# thread, so 7-10 fit; 6 keep 24 warps and about 43 KB of loads in flight per SM); the SASS
# of starting an image set and merging its lanes at the end of a chunk (30 warp reductions,
# about 480 instructions) in tiles (about 350).
FWD_VEC = 2
FWD_PROGRAMS_PER_SM = 6
FWD_MERGE_TILES = 1.4


@triton.jit
def _to_fp32(x):
    """x as fp32; bf16 through its bits (ptxas widens each half of a loaded pair with one shift
    or mask, where the generic conversion takes three instructions per pair)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _sum_paired(rest, own, i: tl.constexpr):
    """The sum over the crops paired with teacher view i: `rest` (crops NT..V-1, paired with
    every view) plus own[j] (crop j, the same view as teacher view j) for j != i."""
    for j in tl.static_range(len(own)):
        if j != i:
            rest += own[j]
    return rest


@triton.jit
def _sum_over_images(x, IMAGES: tl.constexpr, TILE: tl.constexpr):
    """[IMAGES, TILE] -> [TILE]: sums over the images (one per warp on the GPU) by halving, in a
    fixed order. Each split needs its halves in one thread, so the images move through shared
    memory once (sm_90: one stmatrix, two ldmatrix, two barriers); a tl.sum across warps would
    also shuffle within warps."""
    x = tl.trans(x)  # [TILE, IMAGES]
    for _ in tl.static_range(IMAGES.bit_length() - 1):
        lo, hi = tl.split(tl.reshape(x, [TILE, x.shape[1] // 2, 2]))
        x = lo + hi
    return tl.reshape(x, [TILE])


@triton.jit
def _dino_loss_fwd_kernel(
    S,  # [V*B, K] student logits, crop-major
    T,  # [NT*B, K] teacher logits, view-major
    C,  # [K] fp32 centre
    STATE,  # [B, n_chunks, 3*NT + 2*V] fp32 out: (M, Z, W, m, L) of each image and chunk
    COLSUM,  # [n_groups, K] fp32 out: teacher column sums over the images of each group
    B,
    K,
    n_chunks,
    chunk_len,  # columns per chunk, a multiple of LANES * VEC
    n_groups,
    s_scale,  # log2(e) / tau_s
    t_scale,  # log2(e) / tau_t
    V: tl.constexpr,
    NT: tl.constexpr,
    IMAGES: tl.constexpr,  # images streamed side by side (one per warp on the GPU)
    LANES: tl.constexpr,  # lanes per image (one per thread of its warp)
    VEC: tl.constexpr,  # adjacent columns of a lane in one tile
    MASKED: tl.constexpr,  # False where every tile is full: K % (LANES*VEC) == 0 and B % IMAGES == 0
):
    TILE: tl.constexpr = LANES * VEC
    chunk = tl.program_id(0)
    group = tl.program_id(1)
    k_lo = chunk * chunk_len
    k_hi = tl.minimum(k_lo + chunk_len, K)
    rows = tl.cast(B, tl.int64) * K  # elements from crop v's rows to crop v+1's
    first = tl.arange(0, IMAGES) == 0  # the image slot whose threads store the column sums
    for image_set in range(group, tl.cdiv(B, IMAGES), n_groups):
        b = image_set * IMAGES + tl.arange(0, IMAGES)
        b_ok = b < B
        row = b.to(tl.int64) * K
        # Statistics of each lane over the columns it has seen so far, [IMAGES, LANES] each:
        # per view M, Z, W, per crop m, L.
        M = ()
        Z = ()
        W = ()
        for i in tl.static_range(NT):
            M = M + (tl.full([IMAGES, LANES], M_INIT, tl.float32), )
            Z = Z + (tl.zeros([IMAGES, LANES], tl.float32), )
            W = W + (tl.zeros([IMAGES, LANES], tl.float32), )
        m = ()
        L = ()
        for v in tl.static_range(V):
            m = m + (tl.full([IMAGES, LANES], M_INIT, tl.float32), )
            L = L + (tl.zeros([IMAGES, LANES], tl.float32), )
        for k0 in range(k_lo, k_hi, TILE):
            # Rows are loaded as [IMAGES, TILE] (contiguous columns: vector loads, one image
            # per warp) and viewed as [IMAGES, LANES, VEC]: reductions over VEC stay in a thread.
            cols = k0 + tl.arange(0, TILE)
            if MASKED:
                ok2 = b_ok[:, None] & (cols < k_hi)[None, :]
            else:
                ok2 = tl.full([IMAGES, TILE], True, tl.int1)
            ok = tl.reshape(ok2, [IMAGES, LANES, VEC])
            offs = row[:, None] + cols[None, :]  # [IMAGES, TILE]
            # Every image reads the centre (the re-reads hit L1).
            c = tl.load(C + cols[None, :] + 0 * row[:, None], mask=ok2, other=0.0, eviction_policy="evict_last")
            # Teacher views: new maxima M', rescale factors 2^(a (M - M')), weights 2^(a (u - M')).
            # (No eviction hints on the streamed rows: on sm_90 each hinted load rebuilds its
            # cache-policy descriptor, 5 instructions.)
            M_next = ()
            Z_next = ()
            alpha = ()
            e = ()
            for i in tl.static_range(NT):
                t = _to_fp32(tl.load(T + i * rows + offs, mask=ok2, other=0.0))
                if i == 0:
                    t_sum = t
                else:
                    t_sum += t
                u = tl.reshape(tl.where(ok2, t - c, float("-inf")), [IMAGES, LANES, VEC])
                M_i = tl.maximum(M[i], tl.max(u, axis=2))
                e_i = tl.exp2((u - M_i[:, :, None]) * t_scale)
                alpha_i = tl.exp2((M[i] - M_i) * t_scale)
                M_next = M_next + (M_i, )
                Z_next = Z_next + (Z[i] * alpha_i + tl.sum(e_i, axis=2), )
                alpha = alpha + (alpha_i, )
                e = e + (e_i, )
            # Student crops: d = s - m' (m' the lane's new maximum), the lane's normaliser, and
            # the sums of d over the crops each view is paired with.
            m_next = ()
            L_next = ()
            d_own = ()  # crops 0..NT-1, each paired with every view but its own
            shift_own = ()
            for v in tl.static_range(V):
                s = tl.load(S + v * rows + offs, mask=ok2, other=float("-inf"))
                s = tl.reshape(_to_fp32(s), [IMAGES, LANES, VEC])
                m_v = tl.maximum(m[v], tl.max(s, axis=2))
                d = s - m_v[:, :, None]
                shift = m[v] - m_v
                m_next = m_next + (m_v, )
                L_next = L_next + (L[v] * tl.exp2(shift * s_scale) + tl.sum(tl.exp2(d * s_scale), axis=2), )
                if v < NT:
                    d_own = d_own + (d, )
                    shift_own = shift_own + (shift, )
                elif v == NT:  # crops NT..V-1 are paired with every view
                    d_rest = d
                    shift_rest = shift
                else:
                    d_rest += d
                    shift_rest += shift
            if V <= NT:  # no crop beyond the views' own (not a training shape)
                d_rest = tl.zeros([IMAGES, LANES, VEC], tl.float32)
                shift_rest = tl.zeros([IMAGES, LANES], tl.float32)
            # W_i sums 2^(a (u_i - M_i)) * d over the crops paired with view i; moving the crops'
            # maxima from m to m' adds Z_i * (their shifts), moving M_i to M_i' scales by alpha_i.
            W_next = ()
            for i in tl.static_range(NT):
                # Masked columns have d = -inf and weight 0.
                d_paired = tl.where(ok, _sum_paired(d_rest, d_own, i), 0.0)
                W_next = W_next + (alpha[i] * (W[i] + Z[i] * _sum_paired(shift_rest, shift_own, i))
                                   + tl.sum(e[i] * d_paired, axis=2), )
            M = M_next
            Z = Z_next
            W = W_next
            m = m_next
            L = L_next
            # The program owns these columns of its group's row: the first image set writes,
            # the next ones add; the threads of image slot 0 store and read back. k_prev masks
            # every column for the first image set, which has no earlier sum.
            col_sum = _sum_over_images(t_sum, IMAGES, TILE)[None, :]  # [1, TILE]
            k_prev = tl.where(image_set == group, k_lo, k_hi)
            sums = COLSUM + group * K + cols[None, :] + 0 * row[:, None]  # [IMAGES, TILE]
            prev = tl.load(sums, mask=first[:, None] & (cols < k_prev)[None, :], other=0.0)
            tl.store(sums, prev + col_sum, mask=first[:, None] & (cols < k_hi)[None, :])
        # Merge the lanes of each image, once per chunk: common maxima, then rescaled sums.
        # Lane 0 of each image stores: [IMAGES, LANES] stores (contiguous along the lanes, so
        # that their layout is the reductions' own) need no exchange through shared memory.
        lane = tl.arange(0, LANES)[None, :]
        lane0 = b_ok[:, None] & (lane == 0)
        state = STATE + (b * n_chunks + chunk)[:, None] * (3 * NT + 2 * V) + lane
        shift_own = ()
        for v in tl.static_range(V):
            m_all = tl.max(m[v], axis=1)[:, None]
            shift = m[v] - m_all
            tl.store(state + 3 * NT + v, tl.broadcast_to(m_all, [IMAGES, LANES]), mask=lane0)
            L_all = tl.sum(L[v] * tl.exp2(shift * s_scale), axis=1)[:, None]
            tl.store(state + 3 * NT + V + v, tl.broadcast_to(L_all, [IMAGES, LANES]), mask=lane0)
            if v < NT:
                shift_own = shift_own + (shift, )
            elif v == NT:
                shift_rest = shift
            else:
                shift_rest += shift
        if V <= NT:
            shift_rest = tl.zeros([IMAGES, LANES], tl.float32)
        for i in tl.static_range(NT):
            M_all = tl.max(M[i], axis=1)[:, None]
            alpha_i = tl.exp2((M[i] - M_all) * t_scale)
            Z_all = tl.sum(alpha_i * Z[i], axis=1)[:, None]
            W_all = tl.sum(alpha_i * (W[i] + Z[i] * _sum_paired(shift_rest, shift_own, i)), axis=1)[:, None]
            tl.store(state + i, tl.broadcast_to(M_all, [IMAGES, LANES]), mask=lane0)
            tl.store(state + NT + i, tl.broadcast_to(Z_all, [IMAGES, LANES]), mask=lane0)
            tl.store(state + 2 * NT + i, tl.broadcast_to(W_all, [IMAGES, LANES]), mask=lane0)


@triton.jit
def _dino_loss_fwd_finalize_kernel(
    STATE,  # [B, n_chunks, 3*NT + 2*V] fp32: (M, Z, W, m, L) of each image and chunk
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
        # Programs [0, B): merge the chunk states of image b, as the forward merged its lanes.
        b = pid
        j = tl.arange(0, CHUNK_PAD)
        i = tl.arange(0, NT_PAD)
        v = tl.arange(0, V_PAD)
        j_ok = j < n_chunks
        i_ok = i < NT
        v_ok = v < V
        row = (b * n_chunks + j) * (3 * NT + 2 * V)
        ji = row[:, None] + i[None, :]
        ji_ok = j_ok[:, None] & i_ok[None, :]
        jv = row[:, None] + 3 * NT + v[None, :]
        jv_ok = j_ok[:, None] & v_ok[None, :]
        # Padding views/crops read 0 (finite, discarded below); padding chunks get -inf
        # maxima so that their weights vanish, and shifts of 0 rather than -inf.
        M = tl.where(j_ok[:, None], tl.load(STATE + ji, mask=ji_ok, other=0.0), float("-inf"))
        Z = tl.load(STATE + NT + ji, mask=ji_ok, other=0.0)
        W = tl.load(STATE + 2 * NT + ji, mask=ji_ok, other=0.0)
        m = tl.where(j_ok[:, None], tl.load(STATE + jv, mask=jv_ok, other=0.0), float("-inf"))
        L = tl.load(STATE + V + jv, mask=jv_ok, other=0.0)

        M_all = tl.max(M, axis=0)
        alpha = tl.exp2((M - M_all[None, :]) * t_scale)
        m_all = tl.max(m, axis=0)
        shift = tl.where(jv_ok, m - m_all[None, :], 0.0)
        L_all = tl.sum(tl.exp2(shift * s_scale) * L, axis=0)
        Z_all = tl.where(i_ok, tl.sum(alpha * Z, axis=0), 1.0)
        pair = v_ok[None, :] & (i[:, None] != v[None, :])  # [NT_PAD, V_PAD]
        shift_paired = tl.sum(tl.where(pair[None, :, :], shift[:, None, :], 0.0), axis=2)
        W_all = tl.sum(alpha * (W + Z * shift_paired), axis=0)
        # Loss of view i: its paired crops' log2 L_v, minus b W_i / Z_i (every term >= 0).
        log2_L = tl.log2(tl.where(v_ok, L_all, 1.0))
        terms = tl.sum(tl.where(pair, log2_L[None, :], 0.0), axis=1) - s_scale * W_all / Z_all
        tl.store(LOSS + b, tl.sum(tl.where(i_ok, terms, 0.0), axis=0) * loss_scale)
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
    """Launch shape of the kernels; `dino_loss_config` picks it from the problem size.

    A forward tile is `fwd_lanes * fwd_vec` columns of every row of `fwd_images` images; on the
    GPU `fwd_images * fwd_lanes` should be 32 * num_warps (one lane per thread, one image per
    warp), any powers of two are correct.
    """

    fwd_images: int  # forward: images streamed side by side, a power of two
    fwd_lanes: int  # forward: lanes per image (each keeps its own statistics), a power of two
    fwd_vec: int  # forward: adjacent columns of a lane per tile, a power of two
    fwd_chunk_tiles: int  # forward: tiles per K-chunk; one program per (chunk, image group)
    fwd_groups: int  # forward: groups of image sets; a program walks its group's sets in turn
    block_k: int  # backward: columns per tile, a power of two
    bwd_chunk_tiles: int  # backward: tiles per program; one program per (chunk, image)
    num_warps: int = 4


def dino_loss_config(batch: int, n_crops: int, n_teacher: int, K: int, device: torch.device, *,
                     num_sms: int | None = None) -> DinoLossConfig:
    """Default launch shape.

    GPU forward: one image per warp, 32 lanes of FWD_VEC columns (64-column tiles, 3584 values
    of 4 images at 12 crops and 2 views); FWD_PROGRAMS_PER_SM programs per SM, all resident in
    one wave, split over K-chunks (each image set pays one merge of its lanes per chunk, about
    FWD_MERGE_TILES tiles) and groups of image sets (each group costs K * 8 bytes of column
    sums, written and read back), whichever costs least on the busiest SM. The backward: a
    tile holds all crops of one image, about 4096 values, about 8 programs per SM. The
    interpreter prefers few, wide tiles in one program.

    num_sms: SMs of the target GPU, instead of asking `device`; given, the GPU shape is
    returned whatever the device (bench/kernel_report.py compiles for an H100 without one).
    """
    rows = triton.next_power_of_2(n_crops)
    if num_sms is not None or device.type == "cuda":
        sms = num_sms if num_sms is not None else torch.cuda.get_device_properties(device).multi_processor_count
        block_k, bwd_programs = min(2048, max(128, 4096 // rows)), 8 * sms
        images, lanes, vec, fwd_programs = 4, 32, FWD_VEC, FWD_PROGRAMS_PER_SM * sms
    else:
        sms = 1
        block_k, bwd_programs = min(4096, max(64, 32768 // rows)), 1
        images, lanes, vec, fwd_programs = min(4, triton.next_power_of_2(batch)), 512, 8, 1
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    n_tiles = triton.cdiv(K, block_k)
    bwd_chunks = min(n_tiles, triton.cdiv(bwd_programs, batch))
    # Forward: the work of one program (all run at once, so an SM takes as long as its
    # programs' longest) in tiles of one image set, plus the column sums as the tiles that
    # move as many bytes (bf16 logits) spread over the SMs.
    n_sets = triton.cdiv(batch, images)
    fwd_tiles = triton.cdiv(K, lanes * vec)
    tile_bytes = images * lanes * vec * (n_crops + n_teacher) * 2
    best = None
    for groups in sorted({triton.cdiv(n_sets, n) for n in range(1, n_sets + 1)}):
        if groups > fwd_programs:
            break
        chunk_tiles = triton.cdiv(fwd_tiles, max(1, min(fwd_tiles, MAX_FWD_CHUNKS, fwd_programs // groups)))
        cost = (triton.cdiv(n_sets, groups) * (chunk_tiles + FWD_MERGE_TILES) * fwd_programs / sms
                + groups * K * 8 / (tile_bytes * sms))
        if best is None or cost < best[0]:
            best = (cost, groups, chunk_tiles)
    _, groups, chunk_tiles = best
    return DinoLossConfig(fwd_images=images, fwd_lanes=lanes, fwd_vec=vec, fwd_chunk_tiles=chunk_tiles,
                          fwd_groups=groups, block_k=block_k, bwd_chunk_tiles=triton.cdiv(n_tiles, bwd_chunks))


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
    tile = config.fwd_lanes * config.fwd_vec
    n_chunks = triton.cdiv(triton.cdiv(K, tile), config.fwd_chunk_tiles)
    if n_chunks > MAX_FWD_CHUNKS:
        raise ValueError(f"dino_loss: {n_chunks} forward chunks, at most {MAX_FWD_CHUNKS}: raise fwd_chunk_tiles")
    groups = min(triton.cdiv(batch, config.fwd_images), config.fwd_groups)
    v_pad, nt_pad = triton.next_power_of_2(n_crops), triton.next_power_of_2(n_teacher)
    f32 = dict(dtype=torch.float32, device=device)
    state = torch.empty((batch, n_chunks, 3 * n_teacher + 2 * n_crops), **f32)
    colsum = torch.empty((groups, K), **f32)
    _dino_loss_fwd_kernel[(n_chunks, groups)](
        student, teacher, center, state, colsum,
        batch, K, n_chunks, config.fwd_chunk_tiles * tile, groups,
        LOG2E / student_temp, LOG2E / teacher_temp,
        V=n_crops, NT=n_teacher, IMAGES=config.fwd_images, LANES=config.fwd_lanes, VEC=config.fwd_vec,
        MASKED=bool(K % tile or batch % config.fwd_images), num_warps=config.num_warps, enable_fp_fusion=True,
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
    views), teacher_logits [n_teacher_views*B, K], center [K] (or [1, K]); fp32, bf16 or fp16,
    finite logits above -1e30 (the kernels' initial maxima, M_INIT).
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
