"""The log-prob without Triton (CPU): ``logprob_ref``'s values and gradients, the logits made one slice at a time.

``logprob_ref`` builds the fp32 logits of every row at once, and autograd keeps their log-softmax for the
backward: at Qwen2.5's 151,936-token vocabulary and 4,096 rows that is 2.5 GB per copy. Here (the idea of
torchtune's chunked cross-entropy, with the backward written by hand so that nothing N x V is saved) the logits
z = (h @ W_c.T + b_c) / T [N, C] exist for one slice of C vocabulary entries at a time. Slicing the vocabulary
rather than the rows keeps every matmul large in N and reads W once per pass (slices of rows re-read all of W
for each slice: twice the time on CPU at Qwen2.5's shapes).

Forward: the online log-sum-exp of ``kernels/logprob.py``, slice by slice. A slice's statistics relative to its
own maximum m are l = sum_v exp(z_v - m) and a = sum_v exp(z_v - m) (z_v - m); two are merged at m = max(m1, m2):

    l = s1 l1 + s2 l2,    a = s1 (a1 + (m1 - m) l1) + s2 (a2 + (m2 - m) l2),    s_i = exp(m_i - m)

and then lse = m + log l, logp = z_target - lse, entropy = -sum_v p_v log p_v = log l - a / l (no cancellation
when the distribution is peaked: both terms are then small).

Backward: z recomputed per slice, with g = dL/dlogp and p = exp(z - lse) (lse saved from the forward):

    dz = g / T (onehot(target) - p),    dh += dz @ W_c,    dW_c = dz.T @ h,    db_c = sum_n dz

Kept between the two: h, W, b, the targets and lse [N]. Extra memory: two [N, C] fp32 buffers (``_CHUNK_BYTES``
each) and an fp32 dh besides the gradients; the price is the recomputed logits, one more N x V x D matmul. When
the whole vocabulary fits one slice, the reference itself runs (same memory, and its numerics: the CPU demo's
figures stay what they were).
"""
import torch
import torch.nn.functional as F

from nanotorl.kernels.logprob_ref import IGNORE_INDEX, _check, _coef, _outputs, _shaped, logprob_ref

_CHUNK_BYTES = 32 << 20   # the fp32 logits of one slice of the vocabulary, for every row


def _slice_width(N: int) -> int:
    """Vocabulary entries per slice: [N, C] fp32 logits within _CHUNK_BYTES."""
    return max(1, _CHUNK_BYTES // (4 * max(N, 1)))


def _logits(h32, w32, b32, v0, v1, inv_t):
    """z = (h @ W[v0:v1].T + b[v0:v1]) / T in fp32: [N, v1 - v0]."""
    return F.linear(h32, w32[v0:v1], None if b32 is None else b32[v0:v1]).mul_(inv_t)


def _slice_stats(z, entropy: bool):
    """(m, l, a) of one slice z [N, C] (consumed): its row maxima and the sums relative to them (a: 0 if unused)."""
    m = z.amax(-1)
    d = z.sub_(m[:, None])                       # z - m, in place
    e = d.exp()
    l = e.sum(-1)
    return m, l, e.mul_(d).sum(-1) if entropy else torch.zeros_like(l)


def _merge(s1, s2):
    """Statistics (m, l, a) of two slices of the same rows merged into those of both (module docstring)."""
    (m1, l1, a1), (m2, l2, a2) = s1, s2
    m = torch.maximum(m1, m2)
    w1, w2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return m, w1 * l1 + w2 * l2, w1 * (a1 + (m1 - m) * l1) + w2 * (a2 + (m2 - m) * l2)


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, temperature, return_entropy, width):
        h32, w32, b32 = h.float(), weight.float(), None if bias is None else bias.float()
        V, inv_t = weight.shape[0], 1.0 / temperature
        z_t, stats = torch.zeros(h.shape[0], device=h.device), None
        for v0 in range(0, V, width):
            v1 = min(V, v0 + width)
            z = _logits(h32, w32, b32, v0, v1, inv_t)                               # [N, C]
            here = (targets >= v0) & (targets < v1)
            z_t += torch.where(here, z.gather(-1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            s = _slice_stats(z, return_entropy)
            stats = s if stats is None else _merge(stats, s)
        m, l, a = stats
        lse = m + torch.log(l)
        logp = torch.where(targets == IGNORE_INDEX, 0.0, z_t - lse)
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.temperature, ctx.width = temperature, width
        return _outputs(ctx, logp, torch.log(l) - a / l if return_entropy else None)

    @staticmethod
    def backward(ctx, g, *unused_entropy_grad):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        h32, w32, b32 = h.float(), weight.float(), None if bias is None else bias.float()
        coef = _coef(g, targets, ctx.temperature)[:, None]                     # [N, 1]: g / T, 0 if ignored
        dh = torch.zeros_like(h32) if need_h else None
        dw = torch.empty_like(w32) if need_w else None
        db = torch.empty_like(b32) if need_b else None
        V = weight.shape[0]
        for v0 in range(0, V, ctx.width):
            v1 = min(V, v0 + ctx.width)
            dz = _logits(h32, w32, b32, v0, v1, 1.0 / ctx.temperature).sub_(lse[:, None]).exp_().mul_(-coef)
            here = ((targets >= v0) & (targets < v1))[:, None]                    # c (onehot - p), in place
            dz.scatter_add_(-1, (targets[:, None] - v0).clamp(0, v1 - v0 - 1), torch.where(here, coef, 0.0))
            if need_h:
                dh.addmm_(dz, w32[v0:v1])
            if need_w:
                torch.mm(dz.T, h32, out=dw[v0:v1])
            if need_b:
                db[v0:v1] = dz.sum(0)
        return (None if dh is None else dh.to(h.dtype), None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None)


def chunked_logprob(h, weight, targets, bias=None, temperature=1.0, return_entropy=False, width=None):
    """``logprob_ref`` (same arguments and results, differentiable in h, weight and bias) with the logits of at most
    ``width`` vocabulary entries at a time (default: ``_CHUNK_BYTES`` of fp32 logits for all the rows); the
    reference itself when the whole vocabulary fits one slice."""
    lead = h.shape[:-1]
    width = width or _slice_width(lead.numel())
    if width >= weight.shape[0]:
        return logprob_ref(h, weight, targets, bias=bias, temperature=temperature, return_entropy=return_entropy)
    _check(h, weight, targets, bias, temperature)
    out = _ChunkedLogprob.apply(h.reshape(-1, h.shape[-1]), weight, bias, targets.reshape(-1), float(temperature),
                                return_entropy, width)
    return _shaped(out, lead)
