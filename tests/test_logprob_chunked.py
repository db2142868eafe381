"""kernels/logprob_chunked.py: the chunked log-prob against ``logprob_ref`` (values, entropy and gradients), and
its memory, which follows the chunk and not N x V."""
import pytest
import torch

from bench.common import LiveTensorBytes
from nanotorl.kernels.logprob import IGNORE_INDEX, logprob, logprob_ref
from nanotorl.kernels.logprob_chunked import chunked_logprob


def inputs(lead, D, V, bias, dtype=torch.float32, seed=0):
    """h [*lead, D], W [V, D], bias [V] or None (leaves needing grad), targets [*lead] with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, D, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 3 / D ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, lead, generator=g)
    targets.view(-1)[2::5] = IGNORE_INDEX
    return h, W, b, targets


def run(fn, h, W, b, targets, T, **kw):
    """logp, entropy and the gradients (h, W[, b]) of sum(upstream * logp)."""
    logp, entropy = fn(h, W, targets, bias=b, temperature=T, return_entropy=True, **kw)
    upstream = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((logp * upstream).sum(), [x for x in (h, W, b) if x is not None])
    return [logp, entropy, *grads]


@pytest.mark.parametrize("width", [1, 7, 49])
@pytest.mark.parametrize("bias,T", [(False, 1.0), (True, 0.7)])
def test_chunked_equals_reference(width, bias, T):
    """Rows [3, 10], a vocabulary of 50 in slices of 1, 7 (a ragged last slice) and 49 (all but one entry); fp32
    values, entropy and gradients within 1e-6 of each tensor's largest entry (the sums run in another order)."""
    h, W, b, targets = inputs((3, 10), 16, 50, bias)
    got = run(chunked_logprob, h, W, b, targets, T, width=width)
    want = run(logprob_ref, h, W, b, targets, T)
    assert got[0].shape == (3, 10) and got[0].dtype == got[1].dtype == torch.float32
    assert want[0].abs().max() > 1.0, "log-probs too flat for a meaningful comparison"
    assert not got[1].requires_grad and torch.all(got[0].view(-1)[2::5] == 0)
    for name, a, w in zip(("logp", "entropy", "dh", "dW", "db"), got, want):
        scale = float(w.detach().abs().max())
        torch.testing.assert_close(a, w, atol=1e-6 * scale, rtol=0, msg=lambda m: f"{name}: {m}")


def test_chunked_bf16_matches_reference():
    """16-bit inputs: both compute in fp32 and round the gradients to bf16 the same way."""
    h, W, b, targets = inputs((40,), 16, 50, bias=True, dtype=torch.bfloat16)
    got = run(chunked_logprob, h, W, b, targets, 1.0, width=8)
    want = run(logprob_ref, h, W, b, targets, 1.0)
    assert [g.dtype for g in got[2:]] == [torch.bfloat16] * 3
    for a, w in zip(got, want):
        torch.testing.assert_close(a.float(), w.float(), atol=1e-2 * float(w.detach().abs().max()), rtol=0)


def test_one_slice_is_the_reference_itself():
    """What the CPU demo runs (4,096 rows of a vocabulary of 105): bit for bit the reference, through the dispatcher
    the trainer calls."""
    h, W, b, targets = inputs((4096,), 16, 105, bias=False)
    for got, want in zip(run(logprob, h, W, b, targets, 1.0), run(logprob_ref, h, W, b, targets, 1.0)):
        assert torch.equal(got, want)


def test_dispatcher_chunks_large_vocabularies(monkeypatch):
    """kernels.logprob.logprob on CPU takes the chunked path once the logits outgrow a slice."""
    import nanotorl.kernels.logprob_chunked as chunked
    monkeypatch.setattr(chunked, "_CHUNK_BYTES", 4 * 40 * 8)   # 40 rows of 8 logits per slice
    h, W, b, targets = inputs((40,), 16, 50, bias=False)
    calls = []
    monkeypatch.setattr(chunked._ChunkedLogprob, "apply", lambda *a, f=chunked._ChunkedLogprob.apply: calls.append(
        a[-1]) or f(*a))
    logprob(h, W, targets)
    assert calls == [8]


@pytest.mark.parametrize("return_entropy", [False, True])
def test_peak_memory_follows_the_slice_not_n_by_v(return_entropy):
    """Forward and backward at N = 512, V = 32,000: the reference keeps several [N, V] fp32 tensors (62.5 MiB
    each), slices of 1,024 entries need 2 x 2 MiB besides the gradients (dW 4 MiB): under a tenth of its peak."""
    h, W, b, targets = inputs((512,), 32, 32_000, bias=False)

    def peak(fn, **kw):
        with LiveTensorBytes() as live:
            out = fn(h, W, targets, return_entropy=return_entropy, **kw)
            logp = out[0] if return_entropy else out
            torch.autograd.grad(logp.sum(), (h, W))
        return live.peak

    ref, ours = peak(logprob_ref), peak(chunked_logprob, width=1024)
    assert ours < 0.1 * ref, f"chunked peak {ours / 2**20:.1f} MiB, reference {ref / 2**20:.1f} MiB"


def test_rows_of_one_dimension_come_back_as_they_are_not_as_views():
    """As the fused path (tests/test_logprob.py): FSDP2 warns when the model's token_logprobs returns a view."""
    h, W, targets = torch.randn(6, 8, requires_grad=True), torch.randn(40, 8), torch.randint(0, 40, (6,))
    logp, entropy = chunked_logprob(h, W, targets, return_entropy=True, width=16)
    assert logp._base is None and entropy._base is None and chunked_logprob(h, W, targets, width=16)._base is None
    assert chunked_logprob(h.view(2, 3, 8), W, targets.view(2, 3), width=16).shape == (2, 3)
