"""Fused log-prob of target tokens: ``log softmax((h @ W.T + b) / T)[target]`` without the N x V logits.

With Qwen2.5's 151,936-token vocabulary the logits of one micro-batch are gigabytes; the policy loss
only needs one number per token. ``logprob_ref`` (kernels/logprob_ref.py) is the definition, the Triton path
computes the same thing tile by tile.

Forward (online log-sum-exp). The rows ``n`` are split in blocks of BLOCK_N and the vocabulary in
tiles of BLOCK_V; each tile of logits ``z = (h_blk @ W_tile.T + b_tile) / T`` is made with ``tl.dot``
over BLOCK_D slices of D (fp32 accumulation) and folded into three running statistics per row:

    m' = max(m, max_v z_v)                          running maximum
    l' = l * exp(m - m') + sum_v exp(z_v - m')      so that lse = m + log l
    a' = a * exp(m - m') + sum_v exp(z_v - m') z_v  so that sum_v p_v z_v = a / l

plus ``z_t``, the target's logit, taken from whichever tile holds it. The vocabulary is also split
across programs (as in flash-decoding, see ``_splits``); the partial ``(m, l, a, z_t)`` of the
splits are merged by ``_combine`` in PyTorch. Results: ``logp = z_t - lse`` and, for p = softmax(z),
``entropy = -sum_v p_v log p_v = lse - a / l``.

Backward (recompute). With g = dL/dlogp and p = exp(z - lse) (lse saved from the forward):

    dz_nv = g_n * (onehot(t_n)_v - p_nv) / T
    dh = dz @ W      dW = dz.T @ h      db = sum_n dz_n

Each program of the backward owns one (BLOCK_N x BLOCK_V) tile: it recomputes z, forms dz in
registers and adds its share of dh and dW with fp32 atomic adds over BLOCK_D slices, so no N x V
tensor ever exists. Extra memory: the forward keeps lse [N]; the backward an fp32 dh [N, D] and
an fp32 dW scratch for one slice of the vocabulary at a time (``_DW_SCRATCH_BYTES``). The price is
(BLOCK_N + BLOCK_V) x D atomic adds per tile next to its 3 x 2 BLOCK_N BLOCK_V D flops. The adds
are relaxed: a sum needs no ordering with other memory operations, and the default (acquire-release)
would fence every one of them.

Rows whose target is ``IGNORE_INDEX`` (-100) get logp 0 and no gradient. The entropy is a detached
diagnostic (no gradient flows through it, in the reference and in the kernel alike).
The forward kernel also reads logits that already exist (FROM_LOGITS): ``kernels/logprob_logits.py``.
"""
import torch
import triton
import triton.language as tl

from nanotorl import kernels
from nanotorl.kernels.logprob_chunked import chunked_logprob
from nanotorl.kernels.logprob_ref import (IGNORE_INDEX, _check, _check_targets, _coef, _outputs, _shaped,  # noqa: F401
                                         logprob_from_logits_ref, logprob_ref)

_IGNORE = tl.constexpr(IGNORE_INDEX)  # the same value, readable inside kernels
_DW_SCRATCH_BYTES = 128 << 20  # fp32 dW slice accumulated per backward launch


# ----------------------------------------------------------------------------- Triton kernels

@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: the CPU interpreter multiplies 16-bit floats wrongly, so they are
    widened first; the products of two 16-bit floats are exact in fp32, so the result is the same."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, inv_t, HAS_BIAS: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = (h[rows] @ W[cols].T + b[cols]) / T: fp32 [BLOCK_N, BLOCK_V], -inf outside the N x V bounds."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        hb = tl.load(h_ptr + rows[:, None] * D + d[None, :],               # [BLOCK_N, BLOCK_D]
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * D + d[:, None],               # [BLOCK_D, BLOCK_V]
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        acc = _dot(hb, wt, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(row_ok[:, None] & col_ok[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _online_update(m, l, a, zt, z, cols, tgt, RETURN_ENTROPY: tl.constexpr):
    """Fold a tile z [BLOCK_N, BLOCK_V] (-inf where masked) into each row's running (m, l, a, z_t)."""
    m_new = tl.maximum(m, tl.max(z, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no finite logit yet keeps l = 0
    alpha = tl.exp(m - m_ref)
    p = tl.exp(z - m_ref[:, None])                          # 0 where z = -inf
    l = l * alpha + tl.sum(p, 1)
    if RETURN_ENTROPY:  # 0 * log 0 = 0: -inf logits add nothing
        a = a * alpha + tl.sum(p * tl.where(z == float("-inf"), 0.0, z), 1)
    zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
    return m_new, l, a, zt


@triton.jit
def _empty_stats(BLOCK_N: tl.constexpr):
    """Running (m, l, a, z_t) of BLOCK_N rows before any tile: max -inf, sums 0."""
    zero = tl.zeros([BLOCK_N], dtype=tl.float32)
    return zero + float("-inf"), zero, zero, zero


@triton.jit
def _store_partials(stats_ptr, m, l, a, zt, split, rows, row_ok, N):
    """stats: [4, splits, N] fp32 holding (m, l, a, z_t) of this program's vocabulary range."""
    base = stats_ptr + split * N + rows
    plane = tl.num_programs(0) * N
    tl.store(base, m, mask=row_ok)
    tl.store(base + plane, l, mask=row_ok)
    tl.store(base + 2 * plane, a, mask=row_ok)
    tl.store(base + 3 * plane, zt, mask=row_ok)


@triton.jit
def _fwd_kernel(src_ptr, w_ptr, b_ptr, tgt_ptr, stats_ptr, N, V, D, stride_n, tiles_per_split, inv_t,
                FROM_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (vocabulary splits, row blocks): the partial (m, l, a, z_t) of one split of each row's logits,
    made from src = h [N, D] and W, or read from src = logits [N, V] with row stride stride_n (FROM_LOGITS)."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=_IGNORE)
    m, l, a, zt = _empty_stats(BLOCK_N)
    for t in range(tiles_per_split):
        cols = (split * tiles_per_split + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols = cols.to(tl.int64)
        if FROM_LOGITS:
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(src_ptr + rows[:, None] * stride_n + cols[None, :], mask=ok, other=0.0)
            z = tl.where(ok, x.to(tl.float32) * inv_t, float("-inf"))
        else:
            z = _logits_tile(src_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, inv_t,
                             HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        m, l, a, zt = _online_update(m, l, a, zt, z, cols, tgt, RETURN_ENTROPY)
    _store_partials(stats_ptr, m, l, a, zt, split, rows, row_ok, N)


@triton.jit
def _fused_bwd_kernel(h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, coef_ptr, dh_ptr, dw_ptr, db_ptr,
                      N, D, v_start, v_stop, inv_t,
                      HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (BLOCK_N x BLOCK_V) tile of dz = coef * (onehot - p); adds dz @ W to dh, dz.T @ h to dW."""
    # Programs run in groups of GROUP row blocks that sweep the same vocabulary tiles together,
    # so tiles of h and W are reused from L2 and the atomic adds spread over many addresses.
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_col_blocks = tl.cdiv(v_stop - v_start, BLOCK_V)
    pid_r, pid_c = tl.swizzle2d(tl.program_id(0) // n_col_blocks, tl.program_id(0) % n_col_blocks,
                                n_row_blocks, n_col_blocks, GROUP)
    rows = pid_r * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    cols = v_start + pid_c * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_stop
    cols = cols.to(tl.int64)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, D, inv_t,
                     HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)       # g / T, 0 for ignored rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=_IGNORE)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = coef[:, None] * (onehot - tl.exp(z - lse[:, None]))      # [BLOCK_N, BLOCK_V], 0 out of bounds
    if HAS_BIAS:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, 0), mask=col_ok, sem="relaxed")
    dz_in = dz.to(h_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        row_mask = row_ok[:, None] & d_ok[None, :]
        col_mask = col_ok[:, None] & d_ok[None, :]
        if NEED_DH:  # dh[rows, d] += dz @ W[cols, d]
            wb = tl.load(w_ptr + cols[:, None] * D + d[None, :], mask=col_mask, other=0.0)
            tl.atomic_add(dh_ptr + rows[:, None] * D + d[None, :], _dot(dz_in, wb, None, PRECISION, UPCAST),
                          mask=row_mask, sem="relaxed")
        if NEED_DW:  # dW[cols, d] += dz.T @ h[rows, d]
            hb = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_mask, other=0.0)
            tl.atomic_add(dw_ptr + (cols - v_start)[:, None] * D + d[None, :],
                          _dot(tl.trans(dz_in), hb, None, PRECISION, UPCAST), mask=col_mask, sem="relaxed")


# ----------------------------------------------------------------------------- launchers

def _config(t, backward):
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) of the matmul kernels for inputs like ``t``.

    16-bit on GPU: 128 x 128 tiles, pipelined wgmma on sm_90 without register spills (checked by
    compiling for sm_90, see tests). fp32 (exact products, CUDA cores) is the correctness path: smaller
    tiles so that it does not spill either, and so does 16-bit data whose D is not a multiple of 16 (rows
    not aligned for wide loads: the large tiles spill). The interpreter gets the smallest tiles tl.dot takes.
    """
    if not t.is_cuda:
        return 16, 32, 16, 1, 1
    if t.dtype == torch.float32 or t.shape[-1] % 16:
        return 64, 64, (16 if backward else 32), 8, 2
    return 128, 128, 64, 8, (2 if backward else 3)


def _splits(n_row_blocks, n_tiles, t):
    """How many vocabulary ranges the forward's programs share out.

    Enough for about 4 programs per SM when N is small, and at least 16 on GPU: the splits are the
    fastest grid axis, so the ~130 programs running together cover ~8 row blocks x 16 vocabulary
    ranges, whose tiles of h and W fit in L2 together (130 row blocks sharing one range would each
    stream their own rows of h from memory for every tile of W).
    """
    target, least = (4, 2)
    if t.is_cuda:
        target, least = 4 * torch.cuda.get_device_properties(t.device).multi_processor_count, 16
    splits = min(n_tiles, max(least, triton.cdiv(target, n_row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split  # every split starts inside V


def _combine(stats, targets, return_entropy):
    """Merge partial (m, l, a, z_t) [4, splits, N] over splits -> logp [N], lse [N], entropy [N]."""
    m, l, a, zt = stats.unbind(0)
    m_max = m.max(0).values                               # [N]
    w = torch.exp(m - m_max)                              # [splits, N]
    l_tot = (l * w).sum(0)
    lse = m_max + torch.log(l_tot)
    logp = torch.where(targets == IGNORE_INDEX, torch.zeros_like(lse), zt.sum(0) - lse)
    entropy = lse - (a * w).sum(0) / l_tot if return_entropy else None
    return logp, lse, entropy


def _precision(t):
    """Exact fp32 products for fp32 inputs (no TF32) and in the interpreter; 16-bit MMA otherwise."""
    return "ieee" if t.dtype == torch.float32 or not t.is_cuda else "tf32"


def _fused_forward(h, weight, bias, targets, inv_t, return_entropy):
    N, D = h.shape
    V = weight.shape[0]
    bn, bv, bd, warps, stages = _config(h, backward=False)
    n_row_blocks = triton.cdiv(N, bn)
    splits, tiles_per_split = _splits(n_row_blocks, triton.cdiv(V, bv), h)
    stats = torch.empty(4, splits, N, device=h.device, dtype=torch.float32)
    _fwd_kernel[(splits, n_row_blocks)](  # h stands in for a missing bias: never read then
        h, weight, h if bias is None else bias, targets, stats, N, V, D, D, tiles_per_split, inv_t,
        FROM_LOGITS=False, HAS_BIAS=bias is not None, RETURN_ENTROPY=return_entropy, PRECISION=_precision(h), UPCAST=not h.is_cuda,
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=warps, num_stages=stages)
    return _combine(stats, targets, return_entropy)


def _fused_backward(h, weight, bias, targets, lse, coef, inv_t, need):
    """Gradients (dh, dW, db) for the rows' coefficients coef = g / T; ``need`` = (dh?, dW?, db?)."""
    N, D = h.shape
    V = weight.shape[0]
    bn, bv, bd, warps, stages = _config(h, backward=True)
    dh32 = torch.zeros(N, D, device=h.device, dtype=torch.float32) if need[0] else None
    dW = torch.empty_like(weight) if need[1] else None
    db32 = torch.zeros(V, device=h.device, dtype=torch.float32) if bias is not None else None
    chunk = max(bv, _DW_SCRATCH_BYTES // (4 * D) // bv * bv)   # vocabulary rows per launch
    scratch = None
    if need[1] and weight.dtype != torch.float32:
        scratch = torch.empty(min(chunk, V), D, device=h.device, dtype=torch.float32)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        dw_buf = None
        if need[1]:  # fp32 weights accumulate in place; 16-bit ones in an fp32 slice cast afterwards
            dw_buf = dW[v0:v1] if scratch is None else scratch[: v1 - v0]
            dw_buf.zero_()
        grid = (triton.cdiv(N, bn) * triton.cdiv(v1 - v0, bv),)
        _fused_bwd_kernel[grid](
            h, weight, h if bias is None else bias, targets, lse, coef,
            h if dh32 is None else dh32, h if dw_buf is None else dw_buf, h if db32 is None else db32,
            N, D, v0, v1, inv_t, HAS_BIAS=bias is not None, NEED_DH=need[0], NEED_DW=need[1],
            PRECISION=_precision(h), UPCAST=not h.is_cuda, GROUP=8, BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd,
            num_warps=warps, num_stages=stages)
        if scratch is not None:
            dW[v0:v1] = dw_buf
    dh = dh32.to(h.dtype) if need[0] else None
    db = db32.to(bias.dtype) if bias is not None and need[2] else None
    return dh, dW, db


class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, return_entropy):
        logp, lse, entropy = _fused_forward(h, weight, bias, targets, 1.0 / temperature, return_entropy)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.temperature = temperature
        return _outputs(ctx, logp, entropy)

    @staticmethod
    def backward(ctx, g, *unused_entropy_grad):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        dh, dW, db = _fused_backward(h, weight, bias, targets, lse, _coef(g, targets, ctx.temperature),
                                     1.0 / ctx.temperature, need)
        return dh, dW, db, None, None, None


def fused_logprob(h, weight, targets, bias=None, temperature=1.0, return_entropy=False):
    """Triton path of ``logprob_ref``: same arguments and results, never an N x V tensor.

    h: [..., D], weight: [V, D], bias: [V] or None, targets: [...] int (-100 = ignored row).
    Returns logp [...] fp32 (and the detached entropy [...] fp32). Differentiable in h, weight and
    bias. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (small shapes).
    """
    _check(h, weight, targets, bias, temperature)
    lead = h.shape[:-1]
    out = _FusedLogprob.apply(h.reshape(-1, h.shape[-1]).contiguous(), weight.contiguous(),
                              None if bias is None else bias.contiguous(), targets.reshape(-1).contiguous(),
                              float(temperature), return_entropy)
    return _shaped(out, lead)


def logprob(h, weight, targets, bias=None, temperature=1.0, return_entropy=False):
    """What the trainer calls: ``fused_logprob`` when ``kernels.use_triton(h)``, else ``chunked_logprob``
    (``logprob_ref`` one slice of the vocabulary at a time: kernels/logprob_chunked.py)."""
    impl = fused_logprob if kernels.use_triton(h) else chunked_logprob
    return impl(h, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy)
