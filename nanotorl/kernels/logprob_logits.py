"""Log-prob of target tokens from logits that already exist: ``log softmax(logits / T)[target]``.

The same forward as ``kernels/logprob.py`` (its ``_fwd_kernel`` with FROM_LOGITS: the online log-sum-exp over
vocabulary tiles, split across programs and merged by ``_combine``), reading each logit once and writing nothing
of size N x V; ``logprob_from_logits_ref`` there is the definition. The backward writes the gradient of the
logits directly, with g = dL/dlogp and p = exp(x / T - lse) (lse saved from the forward):

    dlogits_nv = g_n * (onehot(t_n)_v - p_nv) / T
"""
import torch
import triton
import triton.language as tl

from nanotorl import kernels
from nanotorl.kernels.logprob import (_IGNORE, _check_targets, _coef, _combine, _fwd_kernel, _outputs, _shaped,
                                      _splits, logprob_from_logits_ref)


@triton.jit
def _logits_bwd_kernel(x_ptr, dx_ptr, tgt_ptr, lse_ptr, coef_ptr, N, V, stride_n, inv_t,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """dx = coef * (onehot - exp(x / T - lse)) for one (BLOCK_N x BLOCK_V) tile; dx is contiguous."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = row_ok[:, None] & (cols < V)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_n + cols[None, :], mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=_IGNORE)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dx = coef[:, None] * (onehot - tl.exp(x.to(tl.float32) * inv_t - lse[:, None]))
    tl.store(dx_ptr + rows[:, None] * V + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


class _LogitsLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, targets, temperature, return_entropy):
        N, V = x.shape
        bn, bv = 4, (2048 if x.is_cuda else 32)
        n_row_blocks = triton.cdiv(N, bn)
        splits, tiles_per_split = _splits(n_row_blocks, triton.cdiv(V, bv), x)
        stats = torch.empty(4, splits, N, device=x.device, dtype=torch.float32)
        _fwd_kernel[(splits, n_row_blocks)](  # x stands in for the unused W and b
            x, x, x, targets, stats, N, V, 0, x.stride(0), tiles_per_split, 1.0 / temperature,
            FROM_LOGITS=True, HAS_BIAS=False, RETURN_ENTROPY=return_entropy, PRECISION="ieee", UPCAST=False,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=16)
        logp, lse, entropy = _combine(stats, targets, return_entropy)
        ctx.save_for_backward(x, targets, lse)
        ctx.temperature = temperature
        return _outputs(ctx, logp, entropy)

    @staticmethod
    def backward(ctx, g, *unused_entropy_grad):
        x, targets, lse = ctx.saved_tensors
        N, V = x.shape
        dx = torch.empty(N, V, device=x.device, dtype=x.dtype)
        bn, bv = 4, (1024 if x.is_cuda else 32)
        _logits_bwd_kernel[(triton.cdiv(N, bn), triton.cdiv(V, bv))](
            x, dx, targets, lse, _coef(g, targets, ctx.temperature), N, V, x.stride(0), 1.0 / ctx.temperature,
            BLOCK_N=bn, BLOCK_V=bv)
        return dx, None, None, None


def logprob_from_logits(logits, targets, temperature=1.0, return_entropy=False):
    """log softmax(logits / T)[target] from logits [..., V] of any float dtype: logp [...] fp32.

    Triton kernel (one read of the logits, fp32 statistics, differentiable in the logits) when
    ``kernels.use_triton(logits)``, else the PyTorch reference. Entropy as in ``logprob_ref``.
    """
    _check_targets(targets, logits.shape[:-1], logits.shape[-1], temperature)
    if not kernels.use_triton(logits):
        return logprob_from_logits_ref(logits, targets, temperature, return_entropy)
    lead, V = logits.shape[:-1], logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = _LogitsLogprob.apply(x, targets.reshape(-1).contiguous(), float(temperature), return_entropy)
    return _shaped(out, lead)

