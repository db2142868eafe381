"""kernels/sampling.py (and its noise, kernels/rng.py): the reference and the Triton sampler against a brute-force definition.

The brute force (``_filtered``) sorts one row in float64 and applies the documented filters one
after the other; every test compares a path's tokens, thresholds or log-probs against it. On CPU
the Triton kernels run under the interpreter: TRITON_INTERPRET is set while kernels.sampling is
imported (``triton.jit`` reads it then) and during this module's tests, not for the rest of the session.
On a CUDA machine the same tests run the compiled kernels on DEV, and ``TestOnGPU`` adds the
Qwen2.5 vocabulary.
"""
import itertools
import math

import pytest
import torch

from conftest import DEV, assert_compiles_for_h100, interpreted
from sm90 import record_launches

S = interpreted("nanotorl.kernels.sampling")
pytestmark = pytest.mark.usefixtures("triton_interpreter")
PATHS = {"ref": S.sample_ref, "triton": S.sample_triton}
BOTH = ["ref", "triton"]
CHI2_PVALUE = 1e-4   # a correct sampler fails a chi-square test with this probability (seeds are fixed)


def _params(B, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0, device=DEV):
    """Per-row parameter tensors; scalars are broadcast, offsets default to offset + row."""
    def full(v, dtype):
        return torch.as_tensor(v, dtype=dtype).expand(B).clone().to(device)
    offsets = torch.arange(B) + offset
    return (full(temperature, torch.float32), full(top_k, torch.int64), full(top_p, torch.float32),
            full(min_p, torch.float32), full(seed, torch.int64), offsets.to(device))


def _filtered(row, T, k, p, q):
    """Brute force for one row ([V]): (kept mask [V], probs [V] float64) after the documented filters."""
    s = row.double() / T
    keep = torch.ones_like(s, dtype=torch.bool)
    srt = s.sort(descending=True).values
    if 0 < k < len(s):
        keep &= s >= srt[k - 1]
    if p < 1:
        e = torch.where(keep, torch.exp(s - s.max()), 0.0).sort(descending=True).values
        excl = torch.cumsum(e, 0) - e
        n_top = max(1, int((excl < p * e.sum()).sum()))
        keep &= s >= srt[n_top - 1]
    if q > 0:
        keep &= s >= s.max() + math.log(q)
    probs = torch.softmax(torch.where(keep, s, -math.inf), 0)
    return keep, probs


def _chi2_pvalue(counts, probs):
    """P(chi2 >= observed) for counts against probs (cells with expected count < 5 are merged)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([exp[big], exp[~big].sum()[None]]).double()
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("path", BOTH)
@pytest.mark.parametrize("B,V,dtype", [(1, 1000, torch.float32), (5, 5003, torch.bfloat16), (3, 4096, torch.float32)])
@pytest.mark.parametrize("with_sampled_row", [False, True], ids=["all-greedy", "mixed"])
def test_greedy_is_first_argmax_with_raw_log_softmax(path, B, V, dtype, with_sampled_row):
    torch.manual_seed(0)
    logits = (torch.randn(B + with_sampled_row, V) * 3).to(dtype)
    logits[0, [7, V - 2]] = logits[0].max() + 1          # a tie: the first index wins
    temperature = torch.tensor([0.0] * B + [1.0] * with_sampled_row)  # a batch with a sampled row takes the full path
    params = _params(B + with_sampled_row, top_k=3, top_p=0.5)
    tokens, logprobs = PATHS[path](logits.to(DEV), temperature.to(DEV), *params[1:])
    expect = logits[:B].float().argmax(-1)
    assert tokens[:B].cpu().tolist() == expect.tolist() and int(tokens[0]) == 7
    ref_lp = torch.log_softmax(logits[:B].float(), -1).gather(1, expect[:, None])[:, 0]
    torch.testing.assert_close(logprobs[:B].cpu(), ref_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", BOTH)
@pytest.mark.parametrize("filt", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_are_deterministic(path, filt):
    torch.manual_seed(1)
    logits = torch.randn(4, 2500) * 2
    tokens, logprobs = PATHS[path](logits.to(DEV), *_params(4, temperature=0.8, **filt))
    assert tokens.cpu().tolist() == logits.argmax(-1).tolist()
    assert torch.equal(logprobs.cpu(), torch.zeros(4))


def _threshold_cases():
    """(logits [B, V], T, k, p, q) with ties (bf16), -inf entries, k >= V, top_p 0 and all filters at once."""
    g = torch.Generator().manual_seed(2)
    B = 12
    cases = []
    for V, dtype, masked in [(37, torch.float32, False), (700, torch.bfloat16, False), (513, torch.float32, True)]:
        logits = (torch.randn(B, V, generator=g) * (1 + 5 * torch.rand(B, 1, generator=g))).to(dtype)
        if masked:
            logits[:, ::3] = -math.inf
        T = 0.3 + torch.rand(B, generator=g)
        k = torch.randint(0, 60, (B,), generator=g)
        k[::4] = 0
        k[1] = V + 5
        p = torch.rand(B, generator=g)
        p[::3] = 1.0
        p[2] = 0.0
        q = torch.rand(B, generator=g) * 0.3
        q[::2] = 0.0
        cases.append((logits, T, k, p, q))
    return cases


def _brute_force_keep(logits, T, k, p, q):
    return [_filtered(logits[b].float(), float(T[b]), int(k[b]), float(p[b]), float(q[b]))[0]
            for b in range(len(logits))]


@pytest.mark.parametrize("case", range(3))
def test_reference_thresholds_match_brute_force(case):
    logits, T, k, p, q = _threshold_cases()[case]
    s = logits.float() / T[:, None]
    tau = S._thresholds_ref(s, k, p, q)
    for b, keep in enumerate(_brute_force_keep(logits, T, k, p, q)):
        assert torch.equal(s[b] >= tau[b], keep), f"row {b}"


@pytest.mark.parametrize("cap", [5, S.SEARCH_CAP])   # 5: several passes over the row before the scratch copy
@pytest.mark.parametrize("case", range(3))
def test_triton_thresholds_match_brute_force(case, cap):
    logits, T, k, p, q = _threshold_cases()[case]
    B, V = logits.shape
    s = logits.float() / T[:, None]
    tau_tl = torch.empty(B, device=DEV)
    dev = [x.to(DEV) for x in (logits, T, k, p, q)]
    zeros = torch.zeros(B, dtype=torch.int64, device=DEV)
    S._prepare_kernel[(B,)](dev[0], V, *dev[1:], zeros, zeros, tau_tl, torch.empty_like(zeros),
                            torch.empty(B, cap, device=DEV), V, FLOOR=S.FLOOR, CAP=cap, NPIV=S.NPIV,
                            BLOCK=S._SEARCH_BLOCK)
    for b, keep in enumerate(_brute_force_keep(logits, T, k, p, q)):
        assert torch.equal(s[b] >= tau_tl[b].cpu(), keep), f"row {b}"


@pytest.mark.parametrize("path", BOTH)
def test_draws_stay_inside_filters_and_logprob_is_the_filtered_one(path):
    torch.manual_seed(3)
    V, N = 300, 32
    row = torch.randn(V) * 2
    T, k, p, q = 0.9, 40, 0.8, 0.02
    keep, probs = _filtered(row, T, k, p, q)
    assert 1 < int(keep.sum()) < 40
    tokens, logprobs = PATHS[path](row.expand(N, V).to(DEV), *_params(N, T, k, p, q, seed=11))
    tokens = tokens.cpu()
    assert keep[tokens].all()
    torch.testing.assert_close(logprobs.cpu(), probs[tokens].log().float(), atol=2e-5, rtol=1e-5)
    assert len(set(tokens.tolist())) > 3


def _chi2_case(multi_block):
    """One row and its filters: a few finite logits spread over three 2048-blocks, or a small filtered row."""
    torch.manual_seed(4)
    if multi_block:
        V = 2 * S.RNG_BLOCK + 77
        row = torch.full((V,), -math.inf)
        # Block 0 holds more mass (5) than block 1 (e + e^-0.5) but a lower max: the block draw must use the mass.
        where = torch.tensor([3, 100, 900, 1500, 2047, 2048, 3000, 4096, V - 1])
        row[where] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.3, -1.0])
        return row, (1.0, 0, 1.0, 0.0)
    return torch.randn(12) * 1.5, (0.7, 8, 0.9, 0.05)


@pytest.mark.parametrize("path,draws", [("ref", 4000), ("triton", 300)])
@pytest.mark.parametrize("multi_block", [False, True])
def test_chi_square_frequencies_match_filtered_distribution(path, draws, multi_block):
    row, (T, k, p, q) = _chi2_case(multi_block)
    keep, probs = _filtered(row, T, k, p, q)
    tokens, _ = PATHS[path](row.expand(draws, len(row)).to(DEV), *_params(draws, T, k, p, q, seed=5, offset=1000))
    counts = torch.bincount(tokens.cpu(), minlength=len(row)).double()
    assert counts[~keep].sum() == 0 and counts[probs == 0].sum() == 0
    assert _chi2_pvalue(counts[keep], probs[keep]) > CHI2_PVALUE


@pytest.mark.parametrize("path", BOTH)
def test_a_row_draws_the_same_token_alone_or_in_any_batch(path):
    torch.manual_seed(6)
    B, V = 6, 2100
    logits = torch.randn(B, V).to(DEV)
    params = _params(B, temperature=[1.0, 0.5, 0.0, 1.3, 1.0, 0.8], top_k=[0, 20, 0, 0, 5, 0],
                     top_p=[1.0, 1.0, 1.0, 0.7, 0.9, 1.0], min_p=[0.0, 0.0, 0.0, 0.0, 0.0, 0.1],
                     seed=[1, 2, 3, 4, 5, 6], offset=40)
    fn = PATHS[path]
    tokens, logprobs = fn(logits, *params)
    perm = torch.tensor([4, 0, 5, 2, 1, 3], device=DEV)
    tokens_p, logprobs_p = fn(logits[perm], *(x[perm] for x in params))
    assert torch.equal(tokens_p, tokens[perm]) and torch.equal(logprobs_p, logprobs[perm])
    for b in (0, 3):
        one = fn(logits[b:b + 1], *(x[b:b + 1] for x in params))
        assert int(one[0]) == int(tokens[b]) and float(one[1]) == float(logprobs[b])
    other_offset = fn(logits, *params[:-1], params[-1] + 1)[0]
    assert not torch.equal(other_offset, tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_draws_the_same_tokens_as_the_reference(dtype):
    torch.manual_seed(7)
    B, V = 12, 2500
    logits = (torch.randn(B, V) * 2).to(dtype).to(DEV)
    params = _params(B, temperature=torch.rand(B) + 0.3, top_k=torch.randint(0, 30, (B,)),
                     top_p=torch.where(torch.rand(B) < 0.5, 1.0, 0.9), seed=torch.randint(0, 2 ** 62, (B,)))
    t_ref, lp_ref = S.sample_ref(logits, *params)
    t_tl, lp_tl = S.sample_triton(logits, *params)
    assert torch.equal(t_ref, t_tl)
    torch.testing.assert_close(lp_tl, lp_ref, atol=1e-5, rtol=1e-5)


def test_dispatcher_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits = torch.randn(3, 50)
    params = _params(3, temperature=0.7, device="cpu")
    assert torch.equal(S.sample(logits, *params)[0], S.sample_ref(logits, *params)[0])


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(3, 50)
    params = list(_params(3, device="cpu"))
    with pytest.raises(ValueError, match=r"logits must be a float \[B, V\]"):
        S.sample_ref(logits[0], *params)
    with pytest.raises(ValueError, match=r"temperature must have shape \[3\]"):
        S.sample_ref(logits, params[0][:2], *params[1:])
    params[1] = params[1].int()
    with pytest.raises(ValueError, match="top_k must be int64"):
        S.sample_triton(logits, *params)


QWEN_VOCAB = 151936


def _gpu_launches():
    """Every launch of the tests that run on a GPU (the vocabularies of TestOnGPU, of the chi-square rows and of
    the batch tests, in both dtypes) and of ``bench.sampling``; the generator's are in tests/test_capturable.py."""
    import bench.sampling

    def launch(B, V, dtype):
        floats, ints = (torch.empty(B, device="meta", dtype=t) for t in (torch.float32, torch.int64))
        S.sample_triton(torch.empty(B, V, device="meta", dtype=dtype), floats, ints, floats, floats, ints, ints)

    for V, dtype in itertools.product([12, 2500, 2 * S.RNG_BLOCK + 77, QWEN_VOCAB], [torch.float32, torch.bfloat16]):
        launch(64, V, dtype)
    for quick in (True, False):
        for B, dtype in bench.sampling.gpu_shapes(quick):
            launch(B, bench.sampling.GPU_VOCAB, dtype)


def test_every_gpu_launch_compiles_for_h100():
    """Every launch the GPU tests and benchmarks make, compiled for sm_90 with the launcher's blocks (no GPU
    needed): no register spills, shared memory within an SM, and the search's scratch copy fenced by a barrier
    before it is read back (other threads of the program wrote it)."""
    assert_compiles_for_h100(record_launches(_gpu_launches))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the compiled kernels")
class TestOnGPU:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_qwen_vocabulary_matches_reference(self, dtype):
        torch.manual_seed(8)
        B, V = 64, QWEN_VOCAB
        logits = (torch.randn(B, V, device="cuda") * 3).to(dtype)
        params = _params(B, temperature=torch.where(torch.rand(B) < 0.2, 0.0, 1.0),
                         top_k=torch.where(torch.rand(B) < 0.3, 50, 0),
                         top_p=torch.where(torch.rand(B) < 0.5, 0.95, 1.0),
                         seed=torch.arange(B) * 7919, offset=123)
        t_ref, lp_ref = S.sample_ref(logits, *params)
        t_tl, lp_tl = S.sample_triton(logits, *params)
        assert (t_ref == t_tl).float().mean() >= 0.95          # near ties may round apart
        same = t_ref == t_tl
        torch.testing.assert_close(lp_tl[same], lp_ref[same], atol=1e-4, rtol=1e-4)

    def test_chi_square_with_many_draws(self):
        row, (T, k, p, q) = _chi2_case(False)
        keep, probs = _filtered(row, T, k, p, q)
        draws = 200000
        tokens, _ = S.sample_triton(row.expand(draws, len(row)).cuda(), *_params(draws, T, k, p, q, device="cuda"))
        counts = torch.bincount(tokens.cpu(), minlength=len(row)).double()
        assert counts[~keep].sum() == 0
        assert _chi2_pvalue(counts[keep], probs[keep]) > CHI2_PVALUE
