"""Sampling one token per row from logits with temperature, top-k, top-p and min-p, without a sort.

Math. Row b holds logits ``l: [V]``. With temperature ``T > 0`` the scaled logits are ``s = l / T``.
The filters then run in this order, each keeping the tokens whose scaled logit reaches a threshold:

1. top-k  (k > 0):   tau_k = the k-th largest s (ties with it are kept, so a tie may keep more than k).
2. top-p  (p < 1):   among the top-k survivors, tau_p = the largest value v with  sum_{s_i >= v} e^{s_i} >= p * Z_k
                     (Z_k = the survivors' mass): the smallest set of top tokens holding mass p, ties kept.
3. min-p  (q > 0):   tau_m = max(s) + log(q), i.e. keep p_i >= q * p_max (relative to the max prob, which
                     every filter keeps, so it does not depend on the renormalisation before it).

The token is drawn from ``p'_i = e^{s_i} / Z_S`` over the survivors ``S = {i : s_i >= max(tau_k, tau_p, tau_m)}``,
and ``logprob = s_tok - log Z_S`` is its log-prob under that distribution. ``T = 0`` is greedy: the first
argmax of ``l``, with ``logprob = log_softmax(l)[tok]``.

Drawing: Gumbel-max, ``argmax_i (s_i + g_i)`` with ``g_i = -log(-log u_i)`` is distributed as ``p'``. It runs in
two levels over fixed vocabulary blocks of ``RNG_BLOCK`` tokens: pick block c by Gumbel-max over the block
log-masses ``log Z_c + G_c``, then the token within block c by Gumbel-max over its survivors. Because
``P(i) = Z_c / Z_S * e^{s_i} / Z_c`` this is exact, and it needs noise only for the blocks and one block's
tokens. Every uniform ``u`` is a hash of (seeds[b], offsets[b], index) (``kernels/rng.py``): a row draws the
same token whatever batch it is in, and the reference and the Triton kernel draw the same token from the
same logits (up to float rounding in near ties). ``u`` carries 23 random bits, so ``g`` lies in [-2.8, 16.6]: a token (block)
more than 19.4 below the top of its block (the top block) is never drawn, a probability below 1e-5 in all.

Thresholds without a sort (Triton): a search over values keeps ``lo <= tau <= hi`` with lo and hi data
values. Each pass over the row counts (top-k) or sums the mass (top-p) of the tokens at or above
``NPIV`` pivots spread over [lo, hi], and records the smallest token at or above and the largest token
below each pivot; the bracket shrinks to the data inside the pivot interval holding tau, until lo == hi.
Once the bracket holds at most ``SEARCH_CAP`` tokens they are copied to a per-row scratch buffer and the
remaining passes read only those (plus the count or mass above the bracket), so a search costs about
two or three reads of the row. Tokens more than ``FLOOR`` below the max (probability under e^-80) are
left out of the search.

Kernels: ``_prepare_kernel`` (a program per row: the thresholds, nothing read for unfiltered rows, and the
row's key), ``_block_kernel`` (a program per row and block: the one read of the logits) and
``_finish_kernel`` (a program per row: the block draw, then one block re-read for the token draw).
"""
import math

import torch
import triton
import triton.language as tl

from nanotorl import kernels
from nanotorl.kernels.rng import STREAM_BLOCK, STREAM_TOKEN, first_word, gumbel, gumbel_tl, row_key, row_key_tl

RNG_BLOCK = 2048   # tokens per block of the two-level Gumbel-max; part of what a (seed, offset) means
FLOOR = 80.0       # the search ignores scaled logits below max - FLOOR
NPIV = 16          # pivots per search pass
SEARCH_CAP = 16384  # the search moves to a per-row scratch copy once its bracket holds this few tokens
_SEARCH_BLOCK = 128   # logits per search iteration: at 256, the fp32 threshold search spills registers (triton 3.6)
_BLOCKS_PER_PROGRAM = 4   # the block kernel reads 4 x 2048 logits per program (16-32 KiB in flight)
_CHUNK = 1 << 19   # logits per row chunk of the reference's full-vocabulary passes (2 MiB in float32)


# ----------------------------------------------------------------------------------------- reference

def _thresholds_ref(s: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """tau: [B], the smallest kept scaled logit of each row (-inf keeps all); s: [B, V] float32."""
    B, V = s.shape
    inf = torch.full((B,), -math.inf, device=s.device)
    m = s.amax(-1)
    use_k = (top_k > 0) & (top_k < V)
    tau_k = inf
    if bool(use_k.any()):
        kmax = int(top_k[use_k].max())
        kth = torch.topk(s, kmax, dim=-1).values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])[:, 0]
        tau_k = torch.where(use_k, kth, inf)
    tau_p = inf
    use_p = top_p < 1
    if bool(use_p.any()):
        # Sorted mass from the top; a top-k of growing size stands in for a full sort while it can.
        kept = s.masked_fill(s < tau_k[:, None], -math.inf)
        e = torch.exp(kept - m[:, None])
        target = top_p * e.sum(-1)                                   # p * Z_k: [B]
        n = min(V, 1024)
        while True:
            top = torch.topk(kept, n, dim=-1).values                 # [B, n] descending
            et = torch.exp(top - m[:, None])
            excl = et.cumsum(-1) - et                                # mass strictly above each rank
            keep = excl < target[:, None]
            keep[:, 0] = True
            if n == V or not bool(keep[:, -1][use_p].any()):
                break
            n = min(V, 8 * n)
        last = keep.sum(-1) - 1                                      # keep is a prefix of the ranks
        tau_p = torch.where(use_p, top.gather(1, last[:, None])[:, 0], inf)
    tau_m = torch.where(min_p > 0, m + torch.log(min_p.float()), inf)
    return torch.maximum(torch.maximum(tau_k, tau_p), tau_m)


def sample_ref(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """PyTorch reference: the definition above, vectorised over rows.

    The passes over the whole vocabulary (scaling, thresholds, block masses) run ``_CHUNK`` logits at a time, so
    their temporaries stay in cache; the draw then reads only the chosen block of each row, and hashes only the
    noise it needs. Returns tokens [B] int64 and logprobs [B] float32.
    """
    _check(logits, temperature, top_k, top_p, min_p, seeds, offsets)
    B, V = logits.shape
    greedy = temperature <= 0
    if bool(greedy.all()):  # greedy evaluation: no filters, no noise
        lp = torch.log_softmax(logits.float(), -1)
        tokens = logits.argmax(-1)
        return tokens, lp.gather(1, tokens[:, None])[:, 0]
    any_greedy = bool(greedy.any())
    t = torch.where(greedy, 1.0, temperature).float()
    W = min(V, RNG_BLOCK)                                             # block width (one short block if V is small)
    nb = triton.cdiv(V, W)
    filtered = bool((((top_k > 0) & (top_k < V)) | (top_p < 1) | (min_p > 0)).any())   # some row filters
    rows = max(1, _CHUNK // (nb * W))                                  # rows per chunk of the scan
    per_row = (logits, t, greedy, top_k, top_p, min_p)
    parts = [_scan(*(x[r:r + rows] for x in per_row), filtered, any_greedy, nb, W) for r in range(0, B, rows)]
    lse_c, tau, bmax = (None if x[0] is None else x[0] if len(x) == 1 else torch.cat(x)
                        for x in zip(*(part[:3] for part in parts)))
    key = row_key(seeds, offsets)
    c = _block_ref(lse_c, bmax, key, greedy)                         # chosen block: [B]
    cand = _block_survivors(logits, t, tau, c, W, parts[0][3] if len(parts) == 1 else None)   # [B, W]
    words = first_word(nb * W, STREAM_TOKEN, logits.device).view(nb, W)
    score = cand + gumbel(key, words[0] if nb == 1 else words[c])
    pick = (torch.where(greedy[:, None], cand, score) if any_greedy else score).argmax(-1)
    tokens = pick if nb == 1 else c * W + pick
    log_z = lse_c[:, 0] if nb == 1 else torch.logsumexp(lse_c, -1)  # log Z_S (of one block: that block's, exactly)
    return tokens, cand.gather(1, pick[:, None])[:, 0] - log_z


def _scan(logits, t, greedy, top_k, top_p, min_p, filtered: bool, block_max: bool, nb: int, W: int):
    """The full-vocabulary passes over R rows: s = l / T padded to whole blocks with -inf, the threshold tau [R]
    (-inf keeps all, and on greedy rows; None if no row filters), the survivors' block log-masses log Z_c [R, nb],
    the block maxima [R, nb] (greedy rows draw from the block of their largest logit) if ``block_max``, and the
    survivors' s in blocks [R, nb, W]."""
    R, V = logits.shape
    sp = torch.empty(R, nb * W, device=logits.device)
    if nb * W > V:
        sp[:, V:] = -math.inf
    s = torch.div(logits.float(), t[:, None], out=sp[:, :V])
    tau = None
    if filtered:
        tau = _thresholds_ref(s, top_k, top_p.float(), min_p).masked_fill_(greedy, -math.inf)
        s.masked_fill_(s < tau[:, None], -math.inf)                  # only survivors stay finite
    blocks = sp.view(R, nb, W)
    return torch.logsumexp(blocks, -1), tau, blocks.amax(-1) if block_max else None, blocks


def _block_ref(lse_c, bmax, key, greedy) -> torch.Tensor:
    """The first level of the draw: block c [B] by Gumbel-max over the block log-masses (greedy rows, where
    ``bmax`` is given: the block of the largest logit); with one block there is nothing to draw."""
    B, nb = lse_c.shape
    if nb == 1:
        return torch.zeros(B, dtype=torch.int64, device=lse_c.device)
    score = lse_c + gumbel(key, first_word(nb, STREAM_BLOCK, lse_c.device))
    return (score if bmax is None else torch.where(greedy[:, None], bmax, score)).argmax(-1)


def _block_survivors(logits, t, tau, c, W, blocks) -> torch.Tensor:
    """s = l / T in block c of each row ([B] chosen blocks), -inf past the vocabulary and below tau: [B, W]. Read
    from the scan's ``blocks`` [B, nb, W] where it kept every row (one chunk), else recomputed from the logits."""
    B, V = logits.shape
    if blocks is not None:
        return blocks[:, 0] if blocks.shape[1] == 1 else blocks[torch.arange(B, device=c.device), c]
    if V == W:
        s = logits.float() / t[:, None]
    else:
        idx = c[:, None] * W + torch.arange(W, device=logits.device)   # [B, W]
        s = logits.gather(1, idx.clamp(max=V - 1)).float().div_(t[:, None]).masked_fill_(idx >= V, -math.inf)
    return s if tau is None else s.masked_fill_(s < tau[:, None], -math.inf)


def _check(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"sample: logits must be a float [B, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    B = logits.shape[0]
    for name, x in [("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                    ("seeds", seeds), ("offsets", offsets)]:
        if x.shape != (B,) or x.device != logits.device:
            raise ValueError(f"sample: {name} must have shape [{B}] on {logits.device} like the logits rows, "
                             f"got {tuple(x.shape)} on {x.device}; build one value per row")
    for name, x in [("top_k", top_k), ("seeds", seeds), ("offsets", offsets)]:
        if x.dtype != torch.int64:
            raise ValueError(f"sample: {name} must be int64, got {x.dtype}")


# ------------------------------------------------------------------------------------------- Triton

@triton.jit
def _pivot_pass(src, n, t, m, lo, hi, f_above, MASS: tl.constexpr, NPIV: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over s = src[:n] / t with NPIV pivots spread over [lo, hi] (the first is lo, the last hi).

    Per pivot: F = f_above + the count (mass e^{s - m} if MASS) of the s at or above it, how many s are at
    or above it, the smallest s at or above it and the largest s below it.
    """
    j = tl.arange(0, NPIV)
    piv = tl.minimum(lo + (hi - lo) * (j.to(tl.float32) / (NPIV - 1)), hi)
    piv = tl.where(j == 0, lo, tl.where(j == NPIV - 1, hi, piv))                  # [NPIV]
    f = tl.zeros([NPIV], dtype=tl.float32)
    cnt = tl.zeros([NPIV], dtype=tl.int32)
    above_min = tl.full([NPIV], float("inf"), dtype=tl.float32)
    below_max = tl.full([NPIV], float("-inf"), dtype=tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        s = tl.load(src + idx, mask=idx < n, other=float("-inf")).to(tl.float32) / t          # [BLOCK]
        ge = s[None, :] >= piv[:, None]                                                 # [NPIV, BLOCK]
        cnt += tl.sum(ge.to(tl.int32), axis=1)
        if MASS:
            f += tl.sum(tl.where(ge, tl.exp(s - m)[None, :], 0.0), axis=1)
        above_min = tl.minimum(above_min, tl.min(tl.where(ge, s[None, :], float("inf")), axis=1))
        below_max = tl.maximum(below_max, tl.max(tl.where(ge, float("-inf"), s[None, :]), axis=1))
    if not MASS:
        f = cnt.to(tl.float32)
    return f + f_above, cnt, above_min, below_max


@triton.jit
def _narrow(f, cnt, above_min, below_max, target, hi, NPIV: tl.constexpr):
    """The pivot interval that holds tau: its data bounds (lo, hi), F just above it and its token count."""
    j = tl.arange(0, NPIV)
    jstar = tl.max(tl.where(f >= target, j, -1))                      # the last pivot that keeps enough
    done = jstar == NPIV - 1                                          # tau is the old hi
    new_lo = tl.min(tl.where(j == jstar, above_min, float("inf")))
    new_hi = tl.max(tl.where(j == jstar + 1, below_max, float("-inf")))
    f_up = tl.sum(tl.where(j == jstar + 1, f, 0.0))
    inside = tl.sum(tl.where(j == jstar, cnt, 0)) - tl.sum(tl.where(j == jstar + 1, cnt, 0))
    lo = tl.where(jstar < 0, float("-inf"), tl.where(done, hi, new_lo))
    hi = tl.where(jstar < 0, float("-inf"), tl.where(done, hi, new_hi))
    return lo, hi, f_up, inside


@triton.jit
def _search_tl(row_ptr, scratch_ptr, V, t, m, lo, hi, target, frac, MASS: tl.constexpr, CAP: tl.constexpr,
               NPIV: tl.constexpr, BLOCK: tl.constexpr):
    """tau = the largest scaled logit v with F(v) >= target, F = count (or mass if MASS) of s >= v.

    Needs F(x) < target for all x > hi, and F(lo) >= target (else returns -inf); with frac > 0 the
    target is frac * F(lo), read in the first pass. Passes run over the whole row until the bracket
    holds at most CAP tokens; those are copied to the row's scratch and the search ends there.
    """
    inside = tl.full([], CAP + 1, dtype=tl.int32)
    f_above = 0.0 * m
    passes = tl.zeros([], dtype=tl.int32)
    while (lo < hi) & (inside > CAP):
        f, cnt, above_min, below_max = _pivot_pass(row_ptr, V, t, m, lo, hi, 0.0 * m, MASS, NPIV, BLOCK)
        target = tl.where((passes == 0) & (frac > 0), frac * tl.max(f), target)   # f[0] = F(lo) is the largest
        passes += 1
        lo, hi, f_above, inside = _narrow(f, cnt, above_min, below_max, target, hi, NPIV)
    if lo < hi:
        # The scratch is written and read back by different threads of this program: barriers order the copy
        # after every read of an earlier search's scratch, and every read after the copy.
        tl.debug_barrier()
        n = tl.zeros([], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            s = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32) / t
            keep = (s >= lo) & (s <= hi)
            tl.store(scratch_ptr + n + tl.cumsum(keep.to(tl.int32), axis=0) - 1, s, mask=keep)
            n += tl.sum(keep.to(tl.int32))
        tl.debug_barrier()
        while lo < hi:   # the scratch holds every token of [lo, hi]; f_above counts those above it
            f, cnt, above_min, below_max = _pivot_pass(scratch_ptr, n, 1.0 + 0.0 * m, m, lo, hi, f_above, MASS,
                                                       NPIV, BLOCK)
            lo, hi, _, inside = _narrow(f, cnt, above_min, below_max, target, hi, NPIV)
    return lo


@triton.jit
def _prepare_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, minp_ptr, seed_ptr, off_ptr, tau_ptr,
                    key_ptr, scratch_ptr, V, FLOOR: tl.constexpr, CAP: tl.constexpr, NPIV: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Per row: tau, the smallest kept scaled logit (-inf keeps all), and the row's random key."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    scratch = scratch_ptr + row.to(tl.int64) * CAP
    t = tl.load(temp_ptr + row).to(tl.float32)
    k = tl.load(topk_ptr + row)
    p = tl.load(topp_ptr + row).to(tl.float32)
    q = tl.load(minp_ptr + row).to(tl.float32)
    use_k = (k > 0) & (k < V)
    use_p = p < 1.0
    use_q = q > 0.0
    tau = tl.full([], float("-inf"), tl.float32)
    if (t > 0) & (use_k | use_p | use_q):
        m = tl.full([], float("-inf"), tl.float32)
        mn = tl.full([], float("inf"), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + tl.arange(0, BLOCK)
            s = tl.load(row_ptr + idx, mask=idx < V, other=0.0).to(tl.float32) / t          # [BLOCK]
            m = tl.maximum(m, tl.max(tl.where(idx < V, s, float("-inf"))))
            mn = tl.minimum(mn, tl.min(tl.where(idx < V, s, float("inf"))))
        lo = tl.maximum(mn, m - FLOOR)
        zero = 0.0 * p
        if use_k:
            tau = _search_tl(row_ptr, scratch, V, t, m, lo, m, k.to(tl.float32), zero, False, CAP, NPIV, BLOCK)
        if use_p:
            tau = _search_tl(row_ptr, scratch, V, t, m, tl.maximum(lo, tau), m, zero, tl.maximum(p, 1e-30),
                             True, CAP, NPIV, BLOCK)
        if use_q:
            tau = tl.maximum(tau, m + tl.log(q))
    tl.store(tau_ptr + row, tau)
    tl.store(key_ptr + row, row_key_tl(seed_ptr, off_ptr, row).to(tl.int64))


@triton.jit
def _scaled_survivors(logits_ptr, stride, temp_ptr, tau_ptr, row, idx, V):
    """s = l / T over the survivors (-inf elsewhere) at ``idx`` of ``row``; T = 1 for greedy rows."""
    t = tl.load(temp_ptr + row).to(tl.float32)
    greedy = t <= 0
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + idx, mask=idx < V, other=float("-inf"))
    s = x.to(tl.float32) / tl.where(greedy, 1.0, t)
    return tl.where(s >= tl.load(tau_ptr + row), s, float("-inf")), greedy


@triton.jit
def _block_kernel(logits_ptr, stride, temp_ptr, tau_ptr, key_ptr, score_ptr, lse_ptr, V, NB,
                  RB: tl.constexpr, BPP: tl.constexpr):
    """Per (row, BPP blocks c): log Z_c of the survivors and the score log Z_c + G_c (the block max if greedy)."""
    row = tl.program_id(0)
    blk = tl.program_id(1) * BPP + tl.arange(0, BPP)                                 # [BPP]
    idx = blk[:, None] * RB + tl.arange(0, RB)[None, :]                               # [BPP, RB]
    s, greedy = _scaled_survivors(logits_ptr, stride, temp_ptr, tau_ptr, row, idx, V)
    mx = tl.max(s, axis=1)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    z = tl.sum(tl.exp(s - safe[:, None]), axis=1)                                   # >= 1 unless empty
    lse = tl.where(z > 0, safe + tl.log(tl.maximum(z, 1.0)), float("-inf"))
    g = gumbel_tl(tl.load(key_ptr + row).to(tl.uint32), blk, 1)   # stream STREAM_BLOCK
    tl.store(score_ptr + row * NB + blk, tl.where(greedy, mx, lse + g), mask=blk < NB)
    tl.store(lse_ptr + row * NB + blk, lse, mask=blk < NB)


@triton.jit
def _finish_kernel(logits_ptr, stride, temp_ptr, tau_ptr, key_ptr, score_ptr, lse_ptr, tok_ptr, lp_ptr, V, NB,
                   NB_P2: tl.constexpr, RB: tl.constexpr):
    """Per row: pick the block by its score, then the token inside it; logprob = s_tok - log Z_S."""
    row = tl.program_id(0)
    b = tl.arange(0, NB_P2)
    c = tl.argmax(tl.load(score_ptr + row * NB + b, mask=b < NB, other=float("-inf")), axis=0,
                  tie_break_left=True)
    lse = tl.load(lse_ptr + row * NB + b, mask=b < NB, other=float("-inf"))          # [NB_P2]
    lmax = tl.max(lse)
    log_z = lmax + tl.log(tl.sum(tl.exp(lse - lmax)))                                # log Z_S
    idx = c * RB + tl.arange(0, RB)
    s, greedy = _scaled_survivors(logits_ptr, stride, temp_ptr, tau_ptr, row, idx, V)    # [RB]
    g = gumbel_tl(tl.load(key_ptr + row).to(tl.uint32), idx, 0)   # stream STREAM_TOKEN
    pick = tl.argmax(tl.where(greedy, s, s + g), axis=0, tie_break_left=True)
    s_tok = tl.max(tl.where(tl.arange(0, RB) == pick, s, float("-inf")))
    tl.store(tok_ptr + row, (c * RB + pick).to(tl.int64))
    tl.store(lp_ptr + row, s_tok - log_z)


def sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """Triton path: thresholds and keys (a program per row), block scores (per row and block), then the draw."""
    _check(logits, temperature, top_k, top_p, min_p, seeds, offsets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    nb = triton.cdiv(V, RNG_BLOCK)
    dev = logits.device
    tau = torch.empty(B, device=dev, dtype=torch.float32)
    key = torch.empty(B, device=dev, dtype=torch.int64)
    score = torch.empty(B, nb, device=dev, dtype=torch.float32)
    lse = torch.empty(B, nb, device=dev, dtype=torch.float32)
    tokens = torch.empty(B, device=dev, dtype=torch.int64)
    logprobs = torch.empty(B, device=dev, dtype=torch.float32)
    temp, top_k, top_p, min_p, seeds, offsets = (x.contiguous() for x in (temperature, top_k, top_p, min_p,
                                                                          seeds, offsets))
    scratch = torch.empty(B, SEARCH_CAP, device=dev, dtype=torch.float32)
    _prepare_kernel[(B,)](logits, logits.stride(0), temp, top_k, top_p, min_p, seeds, offsets, tau, key, scratch, V,
                          FLOOR=FLOOR, CAP=SEARCH_CAP, NPIV=NPIV, BLOCK=_SEARCH_BLOCK, num_warps=4)
    _block_kernel[(B, triton.cdiv(nb, _BLOCKS_PER_PROGRAM))](logits, logits.stride(0), temp, tau, key, score, lse,
                                                            V, nb, RB=RNG_BLOCK, BPP=_BLOCKS_PER_PROGRAM, num_warps=8)
    _finish_kernel[(B,)](logits, logits.stride(0), temp, tau, key, score, lse, tokens, logprobs, V, nb,
                         NB_P2=triton.next_power_of_2(nb), RB=RNG_BLOCK, num_warps=8)
    return tokens, logprobs


def sample(logits, temperature, top_k, top_p, min_p, seeds, offsets):
    """Draw one token per row: Triton on CUDA, the PyTorch reference elsewhere (see ``kernels.use_triton``)."""
    fn = sample_triton if kernels.use_triton(logits) else sample_ref
    return fn(logits, temperature, top_k, top_p, min_p, seeds, offsets)
