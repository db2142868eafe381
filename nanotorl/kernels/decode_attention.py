"""Decode attention: one new query token per sequence against its slot of the KV cache (flash-decoding).

Math. Sequence b reads cache row ``slots[b]`` and its first ``lengths[b]`` positions (the token just
written included). Query head h uses KV head ``h // G`` with ``G = Hq / Hkv`` (grouped-query attention):

    x_j = scale * q[b, h] . K[j]        out[b, h] = sum_j softmax(x)_j V[j]       (j < lengths[b])

Flash-decoding (Triton). A single query row leaves one program per (sequence, KV head) with too little
work for a long context, so the keys of each sequence are cut into ``num_splits`` chunks of equal size
(``ceil(len / num_splits)``, rounded up to a tile of BLOCK_N keys). Program (b, kv head, split) loads
each K/V tile once for all G query heads of its group (``tl.dot`` on a [BLOCK_G, d] block of queries,
padded to 16 rows) and keeps the online-softmax state per head:

    m' = max(m, max_j x_j)    l' = l e^{m - m'} + sum_j e^{x_j - m'}    acc' = acc e^{m - m'} + sum_j e^{x_j - m'} V[j]

It writes ``o_s = acc / l`` and ``lse_s = m + log l`` (-inf for an empty chunk). The reduce kernel merges
the splits: ``out = sum_s e^{lse_s - M} o_s / sum_s e^{lse_s - M}`` with ``M = max_s lse_s``.
Exponentials run in base 2 with the scale folded into ``scale * log2(e)``; all accumulation is fp32.
"""
import math

import torch
import triton
import triton.language as tl

from nanotorl import kernels

_LOG2E = 1.4426950408889634


def _config(dtype):
    """(BLOCK_N keys per tile, num_warps): 16-bit tiles feed the tensor cores; fp32 (exact products on
    CUDA cores) takes narrower tiles so that it does not spill (both checked by compiling for sm_90)."""
    return (16, 4) if dtype == torch.float32 else (64, 4)


def _check(q, k_cache, v_cache, slots, lengths):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: expected q [B, Hq, d] and k_cache, v_cache [slots, S, Hkv, d], got "
                         f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    B, Hq, d = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != d or Hq % Hkv != 0:
        raise ValueError(f"decode_attention: need the cache's head dim {k_cache.shape[3]} == q's {d} and Hq = {Hq} "
                         f"a multiple of Hkv = {Hkv}; pass one layer's cache laid out [slots, S, Hkv, d]")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise TypeError(f"decode_attention: q, k_cache, v_cache must share a dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    for name, x in [("slots", slots), ("lengths", lengths)]:
        if x.shape != (B,) or x.dtype != torch.int64:
            raise ValueError(f"decode_attention: {name} must be int64 [{B}], got {x.dtype} {tuple(x.shape)}")


def decode_attention_ref(q, k_cache, v_cache, slots, lengths, scale=None):
    """PyTorch reference over the gathered cache rows, masked beyond each length: [B, Hq, d] in q.dtype."""
    _check(q, k_cache, v_cache, slots, lengths)
    B, Hq, d = q.shape
    Hkv = k_cache.shape[2]
    scale = d ** -0.5 if scale is None else scale
    L = int(lengths.max())
    valid = torch.arange(L, device=q.device) < lengths[:, None]                      # [B, L]
    k = k_cache[slots, :L].float().masked_fill(~valid[:, :, None, None], 0.0)        # [B, L, Hkv, d]
    v = v_cache[slots, :L].float().masked_fill(~valid[:, :, None, None], 0.0)
    qg = q.float().view(B, Hkv, Hq // Hkv, d)                                        # [B, Hkv, G, d]
    x = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale                               # [B, Hkv, G, L]
    p = torch.softmax(x.masked_fill(~valid[:, None, None, :], -math.inf), dim=-1)
    return torch.einsum("bhgl,blhd->bhgd", p, v).reshape(B, Hq, d).to(q.dtype)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b in fp32. UPCAST: the CPU interpreter multiplies 16-bit floats wrongly, so they are widened
    first; products of 16-bit floats are exact in fp32, so the result is the same up to summation order."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, len_ptr, o_ptr, lse_ptr,
                  sq_b, sq_h, sk_n, sk_s, sk_h, sv_n, sv_s, sv_h, qk_scale, G, Hq, NSPLIT, D,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Program (b, kv head, split): o_s [G, d] and lse_s [G] (base 2) of its chunk of the sequence."""
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + b)
    length = tl.load(len_ptr + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, NSPLIT), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kh * G + g                                                               # [BLOCK_G]
    hmask = g < G
    dmask = d < D
    q = tl.load(q_ptr + b.to(tl.int64) * sq_b + heads[:, None] * sq_h + d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)                     # [BLOCK_G, BLOCK_D]
    k_row = k_ptr + slot * sk_n + kh * sk_h
    v_row = v_ptr + slot * sv_n + kh * sv_h
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_row + n[:, None].to(tl.int64) * sk_s + d[None, :], mask=kv_mask, other=0.0)   # [BLOCK_N, BLOCK_D]
        x = _dot(q, tl.trans(k), UPCAST) * qk_scale                                                # [BLOCK_G, BLOCK_N]
        x = tl.where(nmask[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(x - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_row + n[:, None].to(tl.int64) * sv_s + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
        m = m_new
    nonempty = l > 0
    o = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
    row = (b * Hq + heads) * NSPLIT + split                                          # [BLOCK_G]
    tl.store(o_ptr + row[:, None].to(tl.int64) * BLOCK_D + d[None, :], o, mask=hmask[:, None])
    tl.store(lse_ptr + row, lse, mask=hmask)


@triton.jit
def _reduce_kernel(o_ptr, lse_ptr, out_ptr, so_b, so_h, NSPLIT, D,
                   BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, head): merge the splits' (o_s, lse_s) into out[b, head]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    Hq = tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (b * Hq + h) * NSPLIT + s                                                  # [BLOCK_S]
    lse = tl.load(lse_ptr + row, mask=s < NSPLIT, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse))                                                   # 0 for empty splits
    o = tl.load(o_ptr + row[:, None].to(tl.int64) * BLOCK_D + d[None, :], mask=(s < NSPLIT)[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w)                                 # [BLOCK_D]
    tl.store(out_ptr + b.to(tl.int64) * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _num_splits(B, Hkv, S, block_n, q):
    """Enough programs to fill the device (about 4 per SM) without chunks shorter than 4 tiles."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    return max(1, min(triton.cdiv(4 * sms, B * Hkv), triton.cdiv(S, 4 * block_n)))


def decode_attention_triton(q, k_cache, v_cache, slots, lengths, scale=None, num_splits=None):
    """Flash-decoding in Triton: a split kernel over (sequence, KV head, chunk), then a reduce kernel."""
    _check(q, k_cache, v_cache, slots, lengths)
    B, Hq, d = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("decode_attention: the head dimension of q, k_cache and v_cache must be contiguous")
    scale = d ** -0.5 if scale is None else scale
    block_n, warps = _config(q.dtype)
    nsplit = num_splits or _num_splits(B, Hkv, S, block_n, q)
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot needs K >= 16; the kernels mask d < D
    o_part = torch.empty(B, Hq, nsplit, block_d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hq, nsplit, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    slots, lengths = slots.contiguous(), lengths.contiguous()
    _split_kernel[(B, Hkv, nsplit)](
        q, k_cache, v_cache, slots, lengths, o_part, lse_part,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], scale * _LOG2E,
        Hq // Hkv, Hq, nsplit, d,
        BLOCK_G=max(16, triton.next_power_of_2(Hq // Hkv)), BLOCK_D=block_d, BLOCK_N=block_n,
        UPCAST=not q.is_cuda, num_warps=warps)
    _reduce_kernel[(B, Hq)](o_part, lse_part, out, out.stride(0), out.stride(1), nsplit, d,
                            BLOCK_S=triton.next_power_of_2(nsplit), BLOCK_D=block_d, num_warps=4)
    return out


def decode_attention(q, k_cache, v_cache, slots, lengths, scale=None):
    """Attention of one query per sequence over its cache row: Triton on CUDA, the reference elsewhere."""
    fn = decode_attention_triton if kernels.use_triton(q) else decode_attention_ref
    return fn(q, k_cache, v_cache, slots, lengths, scale)
