"""kernels/decode_attention.py: the Triton flash-decoding kernel against the PyTorch reference.

The reference itself is checked against torch's scaled_dot_product_attention run one sequence at a time
on explicit cache slices. On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET is set
while the module is imported and during these tests only); on a CUDA machine the same tests run the
compiled kernels and ``TestOnGPU`` adds the Qwen2.5 shapes.

Stated tolerances: fp32 1e-5 (both sides accumulate in fp32 with ieee dot products); bf16 2e-2 absolute
and relative on outputs up to about 2.5 (the kernel rounds the softmax weights to bf16 before P @ V, the
reference does not, and both round the output to bf16, spaced 2^-8 relative; one bf16 step is observed).
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEV, assert_compiles_for_h100, interpreted
from sm90 import record_launches

DA = interpreted("nanotorl.kernels.decode_attention")
pytestmark = pytest.mark.usefixtures("triton_interpreter")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(B, Hq, Hkv, d, S, lengths, dtype, device=DEV, seed=0):
    """q [B, Hq, d]; caches [B + 2, S, Hkv, d] with NaN in every position no query may read; slots reversed."""
    g = torch.Generator().manual_seed(seed)
    n_slots = B + 2
    q = torch.randn(B, Hq, d, generator=g)
    k = torch.full((n_slots, S, Hkv, d), math.nan)
    v = torch.full((n_slots, S, Hkv, d), math.nan)
    slots = torch.arange(B, dtype=torch.int64).flip(0) + 1
    lengths = torch.as_tensor(lengths, dtype=torch.int64).expand(B).clone()
    for b in range(B):
        L = int(lengths[b])
        k[slots[b], :L] = torch.randn(L, Hkv, d, generator=g)
        v[slots[b], :L] = torch.randn(L, Hkv, d, generator=g)
    return [x.to(device, dtype) for x in (q, k, v)] + [slots.to(device), lengths.to(device)]


def _sdpa_per_sequence(q, k_cache, v_cache, slots, lengths, scale):
    """Independent check of the reference: SDPA on each sequence's slice, KV heads repeated for GQA."""
    B, Hq, d = q.shape
    G = Hq // k_cache.shape[2]
    out = []
    for b in range(B):
        L = int(lengths[b])
        k = k_cache[slots[b], :L].float().transpose(0, 1).repeat_interleave(G, 0)    # [Hq, L, d]
        v = v_cache[slots[b], :L].float().transpose(0, 1).repeat_interleave(G, 0)
        out.append(F.scaled_dot_product_attention(q[b, :, None].float(), k, v, scale=scale)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (7, 1)])
def test_reference_matches_sdpa_per_sequence(Hq, Hkv):
    q, k, v, slots, lengths = _inputs(3, Hq, Hkv, 16, 21, [1, 21, 9], torch.float32, device="cpu")
    out = DA.decode_attention_ref(q, k, v, slots, lengths, scale=0.3)
    torch.testing.assert_close(out, _sdpa_per_sequence(q, k, v, slots, lengths, 0.3), atol=1e-5, rtol=1e-5)


CASES = [  # B, Hq, Hkv, d, S, lengths, num_splits
    (1, 2, 2, 16, 1, [1], 1),
    (2, 4, 2, 8, 40, [40, 7], 2),   # head_dim 8 (the generator tests' tiny model): a 16-wide block, masked
    (1, 4, 2, 64, 37, [37], 3),
    (3, 7, 1, 16, 130, [1, 130, 65], 4),
    (2, 14, 2, 64, 70, [70, 33], None),
    (5, 4, 4, 16, 200, [200, 1, 64, 129, 17], 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,d,S,lengths,num_splits", CASES)
def test_triton_matches_reference(B, Hq, Hkv, d, S, lengths, num_splits, dtype):
    q, k, v, slots, lengths = _inputs(B, Hq, Hkv, d, S, lengths, dtype)
    out = DA.decode_attention_triton(q, k, v, slots, lengths, num_splits=num_splits)
    ref = DA.decode_attention_ref(q, k, v, slots, lengths)
    assert out.dtype == dtype and out.shape == (B, Hq, d) and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_split_count_does_not_change_the_result():
    q, k, v, slots, lengths = _inputs(2, 4, 2, 16, 150, [150, 77], torch.float32)
    outs = [DA.decode_attention_triton(q, k, v, slots, lengths, scale=0.2, num_splits=n) for n in (1, 2, 5)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-5)


def test_strided_query_and_explicit_scale():
    q, k, v, slots, lengths = _inputs(2, 4, 2, 16, 40, [40, 5], torch.float32)
    q_wide = torch.zeros(2, 8, 16, device=DEV)
    q_wide[:, ::2] = q                                                               # q with a head stride of 32
    out = DA.decode_attention_triton(q_wide[:, ::2], k, v, slots, lengths, scale=0.5, num_splits=2)
    torch.testing.assert_close(out, DA.decode_attention_ref(q, k, v, slots, lengths, scale=0.5),
                               atol=1e-5, rtol=1e-5)


def test_dispatcher_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _inputs(2, 4, 2, 16, 10, [10, 3], torch.float32, device="cpu")
    assert torch.equal(DA.decode_attention(*args), DA.decode_attention_ref(*args))


def test_bad_inputs_raise_clear_errors():
    q, k, v, slots, lengths = _inputs(2, 4, 2, 16, 10, [10, 3], torch.float32, device="cpu")
    with pytest.raises(ValueError, match="multiple of Hkv"):
        DA.decode_attention_ref(q[:, :3], k, v, slots, lengths)
    with pytest.raises(ValueError, match=r"expected q \[B, Hq, d\]"):
        DA.decode_attention_triton(q[0], k, v, slots, lengths)
    with pytest.raises(ValueError, match="lengths must be int64"):
        DA.decode_attention_ref(q, k, v, slots, lengths.int())
    with pytest.raises(TypeError, match="share a dtype"):
        DA.decode_attention_ref(q.double(), k, v, slots, lengths)


QWEN_HEADS, GPU_DTYPES = [(12, 2), (28, 4)], [torch.bfloat16, torch.float16]  # TestOnGPU: d = 128, 4096 keys


def _gpu_launches():
    """Every launch of the tests that run on a GPU (CASES in both dtypes, TestOnGPU) and of ``bench.decode``;
    the generator's are recorded by tests/test_capturable.py."""
    import bench.decode

    def launch(B, Hq, Hkv, d, S, dtype, num_splits=None):
        q = torch.empty(B, Hq, d, device="meta", dtype=dtype)
        k, v = (torch.empty(B + 2, S, Hkv, d, device="meta", dtype=dtype) for _ in range(2))
        slots, lengths = (torch.empty(B, device="meta", dtype=torch.int64) for _ in range(2))
        DA.decode_attention_triton(q, k, v, slots, lengths, num_splits=num_splits)

    for B, Hq, Hkv, d, S, _, num_splits in CASES:
        for dtype in TOL:
            launch(B, Hq, Hkv, d, S, dtype, num_splits)
    for (Hq, Hkv), dtype in itertools.product(QWEN_HEADS, GPU_DTYPES):
        launch(8, Hq, Hkv, 128, 4096, dtype)
    for quick in (True, False):
        batches, contexts = bench.decode.gpu_shapes(quick)
        for (Hq, Hkv, d), B, ctx in itertools.product(bench.decode.MODELS.values(), batches, contexts):
            launch(B, Hq, Hkv, d, ctx, bench.decode.GPU_DTYPE)


def test_every_gpu_launch_compiles_for_h100():
    """Every launch the GPU tests and benchmarks make, compiled for sm_90 with the launcher's tiles (no GPU
    needed): no compile error (e.g. tl.dot with K < 16), no register spills, shared memory within an SM."""
    assert_compiles_for_h100(record_launches(_gpu_launches))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the compiled kernels")
class TestOnGPU:
    @pytest.mark.parametrize("Hq,Hkv", QWEN_HEADS)
    @pytest.mark.parametrize("dtype", GPU_DTYPES)
    def test_qwen_heads_long_context(self, Hq, Hkv, dtype):
        lengths = torch.randint(1, 4097, (8,)).tolist()
        lengths[0] = 4096
        q, k, v, slots, lengths = _inputs(8, Hq, Hkv, 128, 4096, lengths, dtype)
        out = DA.decode_attention_triton(q, k, v, slots, lengths)
        ref = DA.decode_attention_ref(q, k, v, slots, lengths)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
