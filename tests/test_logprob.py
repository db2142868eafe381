"""kernels/logprob.py and kernels/logprob_logits.py: the Triton log-prob kernels against the PyTorch reference.

On CPU the kernels run under the Triton interpreter (see ``interpreted`` in tests/conftest.py); with a
CUDA device the compiled kernels run, and ``TestOnGPU`` adds the real shapes.
"""
import itertools

import pytest
import torch

from conftest import DEV, assert_compiles_for_h100, interpreted
from sm90 import record_launches

ON_GPU = DEV == "cuda"
lp = interpreted("nanotorl.kernels.logprob")
lpl = interpreted("nanotorl.kernels.logprob_logits")
pytestmark = pytest.mark.usefixtures("triton_interpreter")


# Stated tolerances. fp32: products and sums in fp32 on both sides. bf16: the forward multiplies
# bf16 values exactly in fp32 as the reference does; the backward rounds dz = g (onehot - p) / T
# to bf16 before its two matmuls (the rounding a bf16 LM-head backward makes) and both sides round
# the gradients to bf16 (2^-8 relative spacing), so they match within 2% of their largest entry.
FWD_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}
GRAD_REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(N, D, V, dtype, device, bias, seed=0):
    """h [N, D], W [V, D], bias [V] or None (all leaves needing grad), targets [N] with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).to(device, dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(device, dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[2::5] = lp.IGNORE_INDEX
    return h, W, b, targets.to(device)


def _grads(fn, h, W, b, targets, T, upstream):
    """logp, entropy and (dh, dW, db) of sum(upstream * logp) for one implementation."""
    for x in (h, W, b):
        if x is not None:
            x.grad = None
    logp, entropy = fn(h, W, targets, bias=b, temperature=T, return_entropy=True)
    (logp * upstream).sum().backward()
    return logp.detach(), entropy, [x.grad.float() for x in (h, W, b) if x is not None]


def _assert_close_grads(got, want, dtype):
    for name, g, w in zip(("dh", "dW", "db"), got, want):
        err = (g - w).abs().max().item()
        assert err <= GRAD_REL[dtype] * w.abs().max().item() + 1e-7, f"{name}: max error {err}"


def check_fused(N, D, V, dtype, device, bias, T):
    h, W, b, targets = _inputs(N, D, V, dtype, device, bias)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(device)
    logp, ent, grads = _grads(lp.fused_logprob, h, W, b, targets, T, upstream)
    logp_ref, ent_ref, grads_ref = _grads(lp.logprob_ref, h, W, b, targets, T, upstream)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == (N,)
    torch.testing.assert_close(logp, logp_ref, atol=FWD_ATOL[dtype], rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=FWD_ATOL[dtype], rtol=0)
    ignored = targets == lp.IGNORE_INDEX
    assert (logp[ignored] == 0).all() and (grads[0][ignored] == 0).all()
    _assert_close_grads(grads, grads_ref, dtype)


def check_from_logits(N, V, dtype, device, T):
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(N, V, generator=g)).to(device, dtype)
    logits[:, V - 20:] = float("-inf")  # masked vocabulary padding, whole tiles of it
    targets = torch.randint(0, V - 20, (N,), generator=g).to(device)
    targets[::3] = lp.IGNORE_INDEX
    upstream = torch.randn(N, generator=g).to(device)
    results = []
    for ref in (False, True):
        x = logits.clone().requires_grad_()
        if ref:
            logp, ent = lp.logprob_from_logits_ref(x, targets, T, return_entropy=True)
        else:
            logp, ent = lpl.logprob_from_logits(x, targets, T, return_entropy=True)
        (logp * upstream).sum().backward()
        results.append((logp.detach(), ent, x.grad.float()))
    (logp, ent, dx), (logp_ref, ent_ref, dx_ref) = results
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=0)
    _assert_close_grads([dx], [dx_ref], dtype)


# ------------------------------------------------------------------- CPU, Triton interpreter

SHAPES = [(1, 24, 50), (37, 40, 100), (64, 48, 96)]  # N = 1; odd sizes, V % BLOCK_V != 0; exact blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("bias,T", [(False, 1.0), (True, 0.7)])
def test_fused_matches_reference(N, D, V, dtype, bias, T):
    check_fused(N, D, V, dtype, "cpu", bias, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_in_vocabulary_slices_matches_reference(monkeypatch, dtype):
    monkeypatch.setattr(lp, "_DW_SCRATCH_BYTES", 4 * 40 * 32)  # 32 vocabulary rows per launch: 4 launches
    check_fused(37, 40, 100, dtype, "cpu", True, 1.3)


def test_only_requested_gradients_are_computed():
    h, W, b, targets = _inputs(19, 24, 50, torch.float32, "cpu", bias=True)
    upstream = torch.randn(19, generator=torch.Generator().manual_seed(2))
    want = _grads(lp.logprob_ref, h, W, b, targets, 1.0, upstream)[2]
    h.grad = W.grad = b.grad = None
    W.requires_grad_(False)
    (lp.fused_logprob(h, W, targets, bias=b) * upstream).sum().backward()
    assert W.grad is None
    _assert_close_grads([h.grad, b.grad], [want[0], want[2]], torch.float32)


def test_large_logits_stay_finite():
    h, W, b, targets = _inputs(5, 24, 50, torch.float32, "cpu", bias=True)
    with torch.no_grad():
        b[7] = 200.0  # exp(200) overflows fp32: only a max-subtracted softmax survives
    upstream = torch.randn(5, generator=torch.Generator().manual_seed(2))
    logp, _, grads = _grads(lp.fused_logprob, h, W, b, targets, 1.0, upstream)
    logp_ref, _, grads_ref = _grads(lp.logprob_ref, h, W, b, targets, 1.0, upstream)
    torch.testing.assert_close(logp, logp_ref, atol=1e-5, rtol=0)
    _assert_close_grads(grads, grads_ref, torch.float32)


def test_single_ignored_row_gives_zero_logp_and_zero_grads():
    h, W, b, _ = _inputs(1, 24, 50, torch.float32, "cpu", bias=True)
    logp = lp.fused_logprob(h, W, torch.tensor([lp.IGNORE_INDEX]), bias=b)
    logp.sum().backward()
    assert logp.item() == 0 and (h.grad == 0).all() and (W.grad == 0).all() and (b.grad == 0).all()


def test_leading_dims_and_non_contiguous_h():
    h, W, _, targets = _inputs(12, 24, 50, torch.float32, "cpu", bias=False)
    h3 = h.detach().reshape(3, 4, 24).transpose(0, 1)  # [4, 3, D], not contiguous
    t3 = targets.reshape(3, 4).T
    got = lp.fused_logprob(h3, W, t3)
    assert got.shape == (4, 3)
    torch.testing.assert_close(got, lp.logprob_ref(h3, W, t3), atol=1e-5, rtol=0)


def test_rows_of_one_dimension_come_back_as_they_are_not_as_views():
    """The model's token_logprobs hands the fused log-prob flat rows and returns its result from a forward that
    FSDP2 wraps; FSDP2 warns on every rank when such a forward returns a view (an in-place op on it would skip the
    pre-backward hook). So flat rows come back as the Function's own output; other shapes as views of it."""
    h, W, b, targets = _inputs(12, 24, 50, torch.float32, "cpu", bias=False)
    for fn in (lp.fused_logprob, lpl.logprob_from_logits):
        args = (h, W, targets) if fn is lp.fused_logprob else (h @ W.T, targets)
        logp, entropy = fn(*args, return_entropy=True)
        assert logp._base is None and entropy._base is None and fn(*args)._base is None
    assert lp.fused_logprob(h.reshape(3, 4, 24), W, targets.reshape(3, 4)).shape == (3, 4)


def test_entropy_is_detached():
    h, W, b, targets = _inputs(5, 24, 50, torch.float32, "cpu", bias=True)
    for fn in (lp.fused_logprob, lp.logprob_ref):
        assert not fn(h, W, targets, bias=b, return_entropy=True)[1].requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,T", [(1, 50, 1.0), (37, 100, 0.7)])
def test_from_logits_matches_reference(N, V, dtype, T):
    check_from_logits(N, V, dtype, "cpu", T)


def test_from_logits_reads_strided_rows_and_columns():
    logits = torch.randn(50, 9)  # stored [V, N]: the [N, V] view has column stride N
    targets = torch.randint(0, 50, (9,))
    want = lp.logprob_from_logits_ref(logits.T, targets, 1.0, return_entropy=False)
    torch.testing.assert_close(lpl.logprob_from_logits(logits.T, targets), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(lpl.logprob_from_logits(logits.T[::2], targets[::2]), want[::2], atol=1e-5, rtol=0)


def test_dispatcher_picks_triton_or_the_torch_path(monkeypatch):
    """The torch path is kernels/logprob_chunked.py (tests/test_logprob_chunked.py holds it to the reference)."""
    calls = []
    monkeypatch.setattr(lp, "fused_logprob", lambda *a, **k: calls.append("fused"))
    monkeypatch.setattr(lp, "chunked_logprob", lambda *a, **k: calls.append("torch"))
    h, W, _, targets = _inputs(3, 24, 50, torch.float32, "cpu", bias=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lp.logprob(h, W, targets)
    monkeypatch.setenv("NANOTORL_KERNELS", "torch")
    lp.logprob(h, W, targets)
    assert calls == ["fused", "torch"]


def test_bad_inputs_raise_clear_errors():
    h, W, _, targets = _inputs(4, 24, 50, torch.float32, "cpu", bias=False)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 50\)"):
        lp.fused_logprob(h, W, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="not its transpose"):
        lp.fused_logprob(h, W.T, targets)
    with pytest.raises(TypeError, match="share a dtype"):
        lp.fused_logprob(h, W.detach().bfloat16(), targets)
    with pytest.raises(ValueError, match="temperature"):
        lp.logprob_ref(h, W, targets, temperature=0.0)


# ------------------------------------------------------------------- sm_90 compilation, no GPU needed

GPU_SHAPES = [(1, 64, 1000), (333, 200, 5003), (1024, 256, 32000)]   # TestOnGPU: N, D, V
GPU_LOGITS = [(1, 1000, 1.0), (333, 50021, 0.7)]                      # TestOnGPU: N, V, T


def _gpu_launches():
    """Every launch of TestOnGPU (forward and backward, with and without bias; from logits) and of
    ``bench.logprob`` (bf16 LM heads, no entropy)."""
    import bench.logprob

    def fused(N, D, V, dtype, bias, entropy):
        h, W = (torch.empty(n, D, device="meta", dtype=dtype, requires_grad=True) for n in (N, V))
        b = torch.empty(V, device="meta", dtype=dtype, requires_grad=True) if bias else None
        out = lp.fused_logprob(h, W, torch.empty(N, device="meta", dtype=torch.int64), bias=b,
                               return_entropy=entropy)
        (out[0] if entropy else out).sum().backward()

    for (N, D, V), dtype, bias in itertools.product(GPU_SHAPES, [torch.float32, torch.bfloat16], [False, True]):
        fused(N, D, V, dtype, bias, entropy=True)
    for (N, V, T), dtype in itertools.product(GPU_LOGITS, [torch.float32, torch.bfloat16]):
        x = torch.empty(N, V, device="meta", dtype=dtype, requires_grad=True)
        lpl.logprob_from_logits(x, torch.empty(N, device="meta", dtype=torch.int64), T, True)[0].sum().backward()
    for quick in (True, False):
        for (D, V), N in itertools.product(bench.logprob.LM_HEADS.values(), bench.logprob.gpu_sizes(quick)):
            fused(N, D, V, bench.logprob.GPU_DTYPE, bias=False, entropy=False)


def test_every_gpu_launch_compiles_for_h100():
    """Every launch the GPU tests and benchmarks make, compiled for sm_90 with the launcher's blocks (no GPU
    needed): within shared memory (227 KiB), everything in registers (no local-memory stack), and the backward's
    atomic adds relaxed (a sum needs no ordering; acquire-release would fence each of ~6e10 adds)."""
    assert_compiles_for_h100(record_launches(_gpu_launches))


# ------------------------------------------------------------------- CUDA, compiled kernels

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device for the compiled kernels")
class TestOnGPU:
    @pytest.fixture(autouse=True)
    def exact_fp32_reference(self, monkeypatch):
        """The reference's fp32 matmul must not use TF32, whatever another module switched on."""
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("N,D,V", GPU_SHAPES)
    @pytest.mark.parametrize("bias,T", [(False, 1.0), (True, 0.7)])
    def test_fused_matches_reference(self, N, D, V, dtype, bias, T):
        check_fused(N, D, V, dtype, "cuda", bias, T)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_backward_in_vocabulary_slices_matches_reference(self, monkeypatch, dtype):
        monkeypatch.setattr(lp, "_DW_SCRATCH_BYTES", 4 * 200 * 1024)
        check_fused(333, 200, 5003, dtype, "cuda", True, 1.3)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("N,V,T", GPU_LOGITS)
    def test_from_logits_matches_reference(self, N, V, dtype, T):
        check_from_logits(N, V, dtype, "cuda", T)
