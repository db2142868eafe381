"""Counter-based random numbers for sampling: Gumbel noise as a pure function of (seed, offset, index).

A row's key is a 32-bit hash of its 64-bit seed and offset; the uniform number of token (or block) ``index``
in stream ``s`` is the hash of (2 index + s, key), and its Gumbel noise is ``g = -log(-log u)``. The hash
is C. Wellons' lowbias32 mixer, absorbing one 32-bit word at a time:

    h = 0;  for each word w:  h = mix(h ^ w),    mix(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
                                                          x *= 0x846CA68B; x ^= x >> 16   (mod 2^32)
    u = (2 (h >> 9) + 1) 2^-24 = ((h >> 8) | 1) 2^-24      in (0, 1), 23 random bits, exact in float32

Nothing is stateful, so a row draws the same noise whatever batch it is in, and the PyTorch functions (32-bit
words in int64 lanes) and the Triton ones (uint32 arithmetic) give the same bits.
"""
import functools

import torch
import triton
import triton.language as tl

STREAM_TOKEN, STREAM_BLOCK = 0, 1   # separate noise for the token draw and the block draw
_M32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x846CA68B)   # lowbias32 multipliers


# ----------------------------------------------------------------------------------------- PyTorch

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """mix(x) in place for int64 x in [0, 2^32): ten tensor ops. PyTorch's int64 product wraps modulo 2^64 (two's
    complement, on CPU and CUDA), which keeps the low 32 bits of x c < 2^64, (x c) mod 2^32, exact; the mask
    drops the rest (tests/test_sampling_draws.py checks the bits against Python integers)."""
    x ^= x >> 16
    x.mul_(_MIX[0]).bitwise_and_(_M32)
    x ^= x >> 15
    x.mul_(_MIX[1]).bitwise_and_(_M32)
    x ^= x >> 16
    return x


def row_key(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from its 64-bit seed and offset: [B] int64 in [0, 2^32). The hash absorbs the low
    and high words of the seed, then of the offset (the first absorb, 0 ^ w = w, is the word itself)."""
    h = _mix32(seeds & _M32)
    for w in ((seeds >> 32) & _M32, offsets & _M32, (offsets >> 32) & _M32):
        h ^= w
        h = _mix32(h)
    return h


@functools.lru_cache(maxsize=16)
def first_word(n: int, stream: int, device: torch.device) -> torch.Tensor:
    """mix(2 i + stream) for every index i < n: the hash of an index after its first word, the same in every row,
    so it is made once per size, stream and device: [n] int64. Callers index it and never write to it."""
    return _mix32(torch.arange(n, device=device) * 2 + stream)


def gumbel(key: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Gumbel noise of the indices whose :func:`first_word` is ``words`` ([B, m], or [m] shared by every row) in the
    rows keyed by ``key`` ([B]): [B, m] float32. The hash absorbs the key after the index's first word."""
    h = _mix32(words ^ key[:, None])
    u = ((h >> 8) | 1).float().mul_(2.0 ** -24)   # in (0, 1), exact in float32
    return u.log_().neg_().log_().neg_()


# ------------------------------------------------------------------------------------------- Triton

@triton.jit
def row_key_tl(seed_ptr, off_ptr, row):
    """row_key for one row: absorb the 32-bit words of seed and offset into the lowbias32 hash."""
    seed = tl.load(seed_ptr + row)
    off = tl.load(off_ptr + row)
    key = tl.zeros([], dtype=tl.uint32)
    for w in tl.static_range(4):
        if w < 2:
            word = (seed >> (32 * w)) & 0xFFFFFFFF
        else:
            word = (off >> (32 * (w - 2))) & 0xFFFFFFFF
        key ^= word.to(tl.uint32)
        key ^= key >> 16
        key *= 0x7FEB352D
        key ^= key >> 15
        key *= 0x846CA68B
        key ^= key >> 16
    return key


@triton.jit
def gumbel_tl(key, index, stream: tl.constexpr):
    """gumbel: hash (2 * index + stream, key) into u in (0, 1), return -log(-log u)."""
    h = (index * 2 + stream).to(tl.uint32)
    for r in tl.static_range(2):
        if r == 1:
            h ^= key
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        h ^= h >> 16
    u = ((h >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08   # 2^-24
    return -tl.log(-tl.log(u))
