"""kernels/rng.py's hash and kernels/sampling.py's reference draws against a brute force with the hash in Python ints.

The brute force (``_draw_one``) is the definition in sampling.py's docstring written out for one row at a time:
the row scaled and filtered (the threshold from ``_thresholds_ref`` on that row alone, tested against a sort in
test_sampling.py), padded to whole blocks, a block by Gumbel-max over the block log-masses, then a token by
Gumbel-max inside it, with every uniform hashed from (seed, offset, index) in Python integers. The reference
sampler must draw the same tokens, whatever batch the rows are in, including at Qwen2.5's vocabulary.
"""
import math

import pytest
import torch

from nanotorl.kernels import rng
from nanotorl.kernels import sampling as S

M32 = 0xFFFFFFFF
QWEN_TOKENS, QWEN_ROWS = 151665, 151936   # Qwen2.5's tokenizer and its output matrix's rows


def _mix(x: int) -> int:
    x ^= x >> 16
    x = x * 0x7FEB352D & M32
    x ^= x >> 15
    x = x * 0x846CA68B & M32
    return x ^ (x >> 16)


def _hash(*words: int) -> int:
    h = 0
    for w in words:
        h = _mix(h ^ (w & M32))
    return h


def _key(seed: int, offset: int) -> int:
    return _hash(seed, seed >> 32, offset, offset >> 32)   # >> on a negative int is two's complement's


def _uniform(key: int, index: int, stream: int) -> float:
    return (2 * (_hash(2 * index + stream, key) >> 9) + 1) * 2.0 ** -24


def _gumbel(key: int, indices, stream: int) -> torch.Tensor:
    u = torch.tensor([_uniform(key, i, stream) for i in indices], dtype=torch.float32)
    return -torch.log(-torch.log(u))


EDGE_SEEDS = [0, 1, -1, 2 ** 63 - 1, -2 ** 63, 0x1234_5678_9ABC_DEF0, 2 ** 32, 2 ** 32 - 1]


def test_row_key_and_noise_equal_the_hash_in_python_integers():
    g = torch.Generator().manual_seed(0)
    seeds = torch.tensor(EDGE_SEEDS + torch.randint(-2 ** 63, 2 ** 63 - 1, (24,), generator=g).tolist())
    offsets = torch.cat([torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 3, 2 ** 63 - 1, 7, 123]),
                         torch.randint(0, 2 ** 62, (24,), generator=g)])
    key = rng.row_key(seeds, offsets)
    expected = [_key(s, o) for s, o in zip(seeds.tolist(), offsets.tolist())]
    assert key.tolist() == expected
    n, stream = 300, rng.STREAM_TOKEN
    index = torch.randint(0, n, (len(key), 40), generator=g)
    noise = rng.gumbel(key, rng.first_word(n, stream, key.device)[index])
    u = torch.tensor([[_uniform(k, i, stream) for i in row] for k, row in zip(expected, index.tolist())],
                     dtype=torch.float32)
    assert torch.equal(noise, -torch.log(-torch.log(u)))   # the same shape, so the same float kernels


def _draw_one(row, T: float, k: int, p: float, q: float, seed: int, offset: int) -> tuple[int, torch.Tensor]:
    """One row's token and log-prob by the definition (see the module docstring)."""
    V = len(row)
    W = min(V, S.RNG_BLOCK)
    nb = math.ceil(V / W)
    greedy = T <= 0
    s = row.float() / (1.0 if greedy else T)
    if not greedy:
        tau = S._thresholds_ref(s[None], torch.tensor([k]), torch.tensor([p]), torch.tensor([q]))
        s = s.masked_fill(s < tau, -math.inf)
    blocks = torch.cat([s, torch.full((nb * W - V,), -math.inf)]).view(nb, W)
    lse = torch.logsumexp(blocks, -1)                                    # [nb]
    key = _key(seed, offset)
    c = 0 if nb == 1 else int((blocks.amax(-1) if greedy else lse + _gumbel(key, range(nb), 1)).argmax())
    cand = blocks[c]
    pick = int((cand if greedy else cand + _gumbel(key, range(c * W, (c + 1) * W), 0)).argmax())
    return c * W + pick, cand[pick] - torch.logsumexp(lse, 0)


def _rows(B: int, V: int, generator) -> tuple:
    """Logits [B, V] of a peaked or a flat shape per row, and per-row parameters: greedy and sampled rows at
    several temperatures, top-p 1 / 0.95 / 0.5, some top-k and min-p, 64-bit seeds, offsets past 2^32."""
    logits = torch.randn(B, V, generator=generator) * (0.5 + 6 * torch.rand(B, 1, generator=generator))
    if V == QWEN_ROWS:
        logits[:, QWEN_TOKENS:] = -math.inf   # rows of the output matrix that no token uses
    pick = lambda values: torch.tensor(values)[torch.randint(0, len(values), (B,), generator=generator)]
    temperature = pick([0.0, 0.6, 1.0, 1.0, 1.3])
    top_k, top_p, min_p = pick([0, 0, 0, 50]), pick([1.0, 1.0, 0.95, 0.5]), pick([0.0, 0.0, 0.0, 0.05])
    seeds = torch.randint(-2 ** 63, 2 ** 63 - 1, (B,), generator=generator)
    offsets = torch.randint(0, 2 ** 34, (B,), generator=generator)
    return logits, temperature, top_k, top_p, min_p, seeds, offsets


@pytest.mark.parametrize("B,V,chunk", [(9, 105, None), (9, 105, 1), (7, 2048, None), (6, 2049, 1), (11, 5003, None),
                                       (11, 5003, 1), (64, 300, None), (8, QWEN_TOKENS, None), (8, QWEN_ROWS, None)])
def test_reference_draws_equal_the_definition_row_by_row(B, V, chunk, monkeypatch):
    """The full-vocabulary passes run in chunks of a few rows at the Qwen2.5 vocabulary, and of one row where
    ``chunk`` sets ``_CHUNK`` to 1; in one chunk the draw reads the scan's blocks, in several it re-reads the logits."""
    if chunk is not None:
        monkeypatch.setattr(S, "_CHUNK", chunk)
    g = torch.Generator().manual_seed(V + B)
    args = _rows(B, V, g)
    tokens, logprobs = S.sample_ref(*args)
    expected = [_draw_one(*(x[b].item() if x.dim() == 1 else x[b] for x in args)) for b in range(B)]
    assert tokens.tolist() == [t for t, _ in expected]
    torch.testing.assert_close(logprobs, torch.stack([lp for _, lp in expected]), rtol=1e-6, atol=1e-6)
    all_sampled = [x.clone() for x in args]
    all_sampled[1].clamp_(min=0.6)                 # every row sampled: the path with no greedy row
    tokens, _ = S.sample_ref(*all_sampled)
    assert tokens.tolist() == [_draw_one(*(x[b].item() if x.dim() == 1 else x[b] for x in all_sampled))[0]
                               for b in range(B)]
