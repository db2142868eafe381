"""Attention over packed rows, without a T x T mask where the hardware allows it.

Training rows [B, T] may hold several sequences; ``seq_ids [B, T]`` says which one each token belongs to, and a
token attends causally within its own sequence only:

    out_i = sum_{j <= i, s_j = s_i} softmax_j(q_i . k_j / sqrt(d)) v_j

Four ways to compute it; :func:`attention_path` picks one from what is available and says why (train.py logs it):

  flash_attn   ``flash_attn_varlen_func``: the sequences laid end to end with their cumulative lengths
               (``cu_seqlens``), each attended causally on its own. CUDA, fp16/bf16, when the optional
               ``flash-attn`` package imports (``pip install -e '.[flash]'``).
  flex         torch's FlexAttention with a causal document ``BlockMask`` built from ``seq_ids``: of the 128 x 128
               blocks of the score matrix, those between different sequences are never computed. Compiled on CUDA,
               once per row shape (the trainer pads rows to a few lengths: ``nanotorl.grpo.micro_batches``).
  dense        SDPA with a boolean mask [B, 1, T, T]: one call that computes every block; the right tool at small T
               (on CUDA K/V are expanded to every query head, so the memory-efficient kernel takes it: sdpa_heads).
  sdpa_varlen  ``flash_attn_varlen_func``'s layout computed by causal SDPA on each sequence in turn: CPU at
               larger T, where a [T, T] mask would outgrow the activations.

The block mask, from the smallest and largest id in each block of 128 tokens (lo, hi): the block pair (q, k) with
k <= q may hold a pair of tokens of the same sequence only if [lo_q, hi_q] and [lo_k, hi_k] overlap (computed, the
mask applied token by token); it is full (computed, no mask) when k < q and both blocks hold one and the same
sequence; otherwise it is skipped. This holds for any ids (a block pair that shares a sequence always overlaps),
and is tight when each sequence is one run of tokens, as the trainer packs them.
"""
import os
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

PATHS = ("flash_attn", "flex", "dense", "sdpa_varlen")
DENSE_MAX_T = 1024   # rows up to this long take the one-call dense path: their [T, T] mask is at most 1 MB
FLEX_BLOCK = 128     # FlexAttention's block size (its default)


@cache
def flash_varlen():
    """(flash_attn_varlen_func, None) when flash-attn imports, else (None, why it does not)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:  # an optional extra: not installed, or built for another torch
        return None, f"flash_attn does not import ({e}); pip install -e '.[flash]' on a CUDA machine"
    return flash_attn_varlen_func, None


def attention_path(device, dtype, T: int) -> tuple[str, str]:
    """(path, why) for packed rows of ``T`` tokens on ``device`` in ``dtype``; one of :data:`PATHS`.

    ``NANOTORL_ATTENTION=<path>`` forces one (A/B comparisons, tests)."""
    forced = os.environ.get("NANOTORL_ATTENTION")
    if forced:
        if forced not in PATHS:
            raise ValueError(f"NANOTORL_ATTENTION must be one of {PATHS}, got {forced!r}")
        if forced == "flash_attn" and flash_varlen()[0] is None:
            raise ValueError(f"NANOTORL_ATTENTION=flash_attn, but {flash_varlen()[1]}")
        return forced, "forced by NANOTORL_ATTENTION"
    cuda = torch.device(device).type == "cuda"
    half = dtype in (torch.float16, torch.bfloat16)
    if cuda and half and flash_varlen()[0] is not None:
        return "flash_attn", "flash_attn imports: variable-length attention, no mask"
    if T <= DENSE_MAX_T:
        return "dense", f"rows of {T} <= {DENSE_MAX_T} tokens: their [T, T] mask is small, one SDPA call"
    if cuda:
        why = flash_varlen()[1] if half else f"flash_attn needs fp16/bf16, not {dtype}"
        return "flex", f"FlexAttention with a document block mask ({why})"
    return "sdpa_varlen", f"{torch.device(device).type} rows of {T} > {DENSE_MAX_T} tokens: causal SDPA per sequence"


def sdpa(q, k, v, mask=None):
    """SDPA in the model's layout. q: [B, T, Hq, d], k/v: [B, S, Hkv, d] (Hq a multiple of Hkv), mask: [B, 1, T, S]
    bool or None (plain causal) -> [B, T, Hq, d]."""
    return sdpa_heads(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)


def sdpa_heads(q, k, v, mask=None):
    """SDPA in the heads-first layout, never on CUDA's math kernel. q: [B, Hq, T, d], k/v: [B, Hkv, S, d], mask:
    [B, 1, T, S] bool, or additive in q's dtype (0 or -inf), or None (plain causal) -> [B, Hq, T, d].

    On CUDA, flash attention takes grouped-query heads but no mask, and the memory-efficient kernel a mask but no
    grouped-query heads; a masked call with Hq > Hkv would fall to the math kernel, which expands K/V itself and
    materialises fp32 [B, Hq, T, S] scores. So a masked call on CUDA gets K/V expanded to every query head first
    (the memory-efficient kernel then takes it); elsewhere SDPA groups the heads itself."""
    if mask is not None and _cuda(q) and k.shape[1] != q.shape[1]:
        k, v = (z.repeat_interleave(q.shape[1] // z.shape[1], dim=1) for z in (k, v))   # [B, Hq, S, d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _cuda(t) -> bool:
    """Whether ``t`` is on CUDA, where SDPA picks among flash, memory-efficient and math kernels."""
    return t.is_cuda


def sequence_mask(seq_ids):
    """Boolean attention mask [B, 1, T, T] for packed or padded rows: token i sees token j <= i of its sequence."""
    T = seq_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seq_ids.device).tril()
    return ((seq_ids[:, :, None] == seq_ids[:, None, :]) & causal)[:, None]


def _grouped(seq_ids):
    """Each row's tokens sorted by sequence id, keeping their order within a sequence (a stable sort):
    (order [B, T], the token indices in that order; first [B, T] bool, True where a sequence's group begins)."""
    ids, order = torch.sort(seq_ids, dim=1, stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return order, first


def sequence_positions(seq_ids):
    """positions [B, T]: the number of earlier tokens of the same sequence in the row, in O(T) memory (a sort and a
    running maximum of where each group begins, not a [T, T] comparison)."""
    order, first = _grouped(seq_ids)
    idx = torch.arange(seq_ids.shape[1], device=seq_ids.device).expand_as(order)   # [B, T]
    start = torch.where(first, idx, 0).cummax(1).values    # where the group of each sorted token begins
    return torch.empty_like(idx).scatter_(1, order, idx - start)


@dataclass
class Packing:
    """What every layer of one forward needs to attend within sequences, worked out once from ``seq_ids``."""
    path: str
    mask: torch.Tensor | None = None       # dense: [B, 1, T, T] bool
    block_mask: BlockMask | None = None    # flex: over rows padded to a multiple of FLEX_BLOCK
    order: torch.Tensor | None = None      # varlen: the B*T tokens grouped by sequence ([B*T]); None if they are
    inverse: torch.Tensor | None = None    # varlen: back to row order
    cu_seqlens: torch.Tensor | None = None  # varlen: [sequences + 1] int32, where each starts in that order
    lengths: tuple[int, ...] = ()          # varlen: the sequences' lengths in that order, on the host
    seq_ids: torch.Tensor | None = None    # flex: the rows' ids [B, T], which its mask function reads


def pack(seq_ids, dtype) -> Packing:
    """The :class:`Packing` of rows ``seq_ids [B, T]`` for activations of ``dtype`` (path: :func:`attention_path`)."""
    path = attention_path(seq_ids.device, dtype, seq_ids.shape[1])[0]
    if path == "dense":
        return Packing(path, mask=sequence_mask(seq_ids))
    if path == "flex":
        return Packing(path, block_mask=document_block_mask(seq_ids), seq_ids=seq_ids)
    B, T = seq_ids.shape
    order, first = _grouped(seq_ids)
    order = (order + T * torch.arange(B, device=seq_ids.device)[:, None]).flatten()   # [B * T]
    starts = first.flatten().nonzero()[:, 0]
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    grouped = not torch.equal(order, torch.arange(B * T, device=order.device))   # only if a sequence is split
    return Packing(path, order=order if grouped else None, inverse=torch.argsort(order) if grouped else None,
                   cu_seqlens=cu, lengths=tuple(cu.diff().tolist()))


def document_block_mask(seq_ids) -> BlockMask:
    """FlexAttention's causal document mask for rows ``seq_ids [B, T]``, padded to whole blocks (the pads form a
    sequence of their own); which blocks are computed follows from each block's smallest and largest id."""
    B, T = seq_ids.shape
    n = -(-T // FLEX_BLOCK)
    ids = _block_padded(seq_ids)                                                        # [B, n * FLEX_BLOCK]
    lo, hi = ids.view(B, n, FLEX_BLOCK).aminmax(dim=-1)                                 # [B, n] each
    blk = torch.arange(n, device=ids.device)
    below, before = blk[None, :] <= blk[:, None], blk[None, :] < blk[:, None]           # [n_q, n_k]: k <= q, k < q
    overlap = (lo[:, None, :] <= hi[:, :, None]) & (lo[:, :, None] <= hi[:, None, :])   # [B, n_q, n_k]
    single = lo == hi
    full = before & single[:, :, None] & single[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    partial = below & overlap & ~full
    return BlockMask.from_kv_blocks(*_kv_blocks(partial), *_kv_blocks(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=document_mask(seq_ids))


def _block_padded(seq_ids):
    """seq_ids [B, T] padded to whole blocks [B, n * FLEX_BLOCK], the pads one id above the largest."""
    B, T = seq_ids.shape
    return torch.cat([seq_ids, (seq_ids.max() + 1).expand(B, -(-T // FLEX_BLOCK) * FLEX_BLOCK - T)], 1)


_DOCUMENT_MASKS = {}  # (padded shape, dtype, device) -> [ids buffer, its mask function, the seq_ids it holds]


def document_mask(seq_ids):
    """The token-level mask function of rows ``seq_ids [B, T]`` padded to whole blocks (same sequence, causal).

    One function per padded row shape, reading the ids from a buffer of that shape: torch.compile guards on the
    function, so a new closure per micro-batch could recompile FlexAttention for each one (torch 2.11). The
    buffer takes ``seq_ids`` unless it holds them already, so :func:`attend` calls this before each attention and
    packings of one shape may be used in turn; a packing's forward and backward must not have another packing of
    its shape in between (autograd then refuses the backward: the buffer it saved was written)."""
    B, T = seq_ids.shape
    key = ((B, -(-T // FLEX_BLOCK) * FLEX_BLOCK), seq_ids.dtype, seq_ids.device)
    if key not in _DOCUMENT_MASKS:
        held = torch.empty(key[0], dtype=seq_ids.dtype, device=seq_ids.device)

        def doc_causal(b, h, q, kv):
            return (held[b, q] == held[b, kv]) & (q >= kv)

        _DOCUMENT_MASKS[key] = [held, doc_causal, None]
    entry = _DOCUMENT_MASKS[key]
    if entry[2] is not seq_ids:
        entry[0].copy_(_block_padded(seq_ids))
        entry[2] = seq_ids
    return entry[1]


def _kv_blocks(blocks):
    """[B, n_q, n_k] bool -> (count [B, 1, n_q] int32, indices [B, 1, n_q, n_k] int32 with the True ones first)."""
    count = blocks.sum(-1, dtype=torch.int32)
    return count[:, None], torch.argsort(~blocks, dim=-1, stable=True).to(torch.int32)[:, None]


@cache
def _compiled_flex():
    """FlexAttention compiled into one fused kernel; recompiled only for a new shape."""
    return torch.compile(flex_attention, dynamic=False)


def attend(q, k, v, packing: Packing):
    """Attention within the sequences of packed rows. q: [B, T, Hq, d], k/v: [B, T, Hkv, d] -> [B, T, Hq, d]."""
    if packing.path == "dense":
        return sdpa(q, k, v, packing.mask)
    if packing.path == "flex":
        document_mask(packing.seq_ids)  # these rows' ids into the buffer their mask function reads
        return _flex(q, k, v, packing.block_mask)
    return _varlen(q, k, v, packing)


def _flex(q, k, v, block_mask):
    """Eager on CPU (the unfused reference FlexAttention ships, forward only: tests), compiled on CUDA."""
    T = q.shape[1]
    pad = block_mask.shape[-2] - T
    q, k, v = (F.pad(z, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for z in (q, k, v))   # [B, H, T_blocks, d]
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=True)[:, :, :T].transpose(1, 2)


def _varlen(q, k, v, p: Packing):
    """The sequences end to end: [B*T, H, d] in sequence order, each attended causally on its own."""
    B, T = q.shape[:2]
    q, k, v = (z.reshape(B * T, *z.shape[2:]) for z in (q, k, v))
    if p.order is not None:
        q, k, v = q[p.order], k[p.order], v[p.order]
    if p.path == "flash_attn":
        longest = max(p.lengths)
        out = flash_varlen()[0](q, k, v, p.cu_seqlens, p.cu_seqlens, longest, longest, causal=True)
    else:  # split, not sliced: the backward writes each gradient once, not a full-size one per sequence
        out = torch.cat([sdpa(*(z[None] for z in qkv))[0] for qkv in zip(*(z.split(p.lengths) for z in (q, k, v)))])
    if p.order is not None:
        out = out[p.inverse]
    return out.view(B, T, *out.shape[1:])
