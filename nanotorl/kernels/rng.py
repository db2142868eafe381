"""Counter-based random numbers for sampling: Gumbel noise as a pure function of (seed, offset, index).

A row's key is a 32-bit hash of its 64-bit seed and offset; the uniform number of token (or block) ``index``
in stream ``s`` is the hash of (2 index + s, key), and its Gumbel noise is ``g = -log(-log u)``. The hash
is C. Wellons' lowbias32 mixer, absorbing one 32-bit word at a time:

    h = 0;  for each word w:  h = mix(h ^ w),    mix(x) = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
                                                          x *= 0x846CA68B; x ^= x >> 16   (mod 2^32)
    u = (2 (h >> 9) + 1) 2^-24                   in (0, 1), 23 random bits, exact in float32

Nothing is stateful, so a row draws the same noise whatever batch it is in, and the PyTorch functions (int64
arithmetic kept below 2^63) and the Triton ones (uint32 arithmetic) give the same bits.
"""
import functools

import torch
import triton
import triton.language as tl

STREAM_TOKEN, STREAM_BLOCK = 0, 1   # separate noise for the token draw and the block draw
_M32 = 0xFFFFFFFF
_MIX = (0x7FEB352D, 0x846CA68B)   # lowbias32 multipliers


# ----------------------------------------------------------------------------------------- PyTorch

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 x in [0, 2^32), without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX[1])
    return x ^ (x >> 16)


def _hash32(*words: torch.Tensor) -> torch.Tensor:
    """Absorb 32-bit words into a hash: h = mix(h ^ word) for each word, from h = 0."""
    h = torch.zeros_like(words[0])
    for w in words:
        h = _mix32(h ^ w)
    return h


def row_key(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from its 64-bit seed and offset: [B] int64 in [0, 2^32)."""
    return _hash32(seeds & _M32, (seeds >> 32) & _M32, offsets & _M32, (offsets >> 32) & _M32)


@functools.lru_cache(maxsize=16)
def _first_word(n: int, stream: int, device: torch.device) -> torch.Tensor:
    """mix(2 i + stream) for every index i < n: the hash of an index after its first word, the same in every row,
    so it is made once per size, stream and device: [n] int64."""
    return _mix32(torch.arange(n, device=device) * 2 + stream)


def gumbel(key: torch.Tensor, index: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Gumbel noise for ``index`` ([B, m] int64, each below ``n``) in the rows keyed by ``key`` ([B]): [B, m]
    float32. The hash absorbs 2 index + stream (its first round read from :func:`_first_word`), then the key."""
    h = _mix32(_first_word(n, stream, key.device)[index] ^ key[:, None])
    u = ((h >> 9) * 2 + 1).float() * 2.0 ** -24   # in (0, 1), exact in float32
    return -torch.log(-torch.log(u))


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
