"""The definition of the log-prob of target tokens in plain PyTorch, and what its two fast paths share.

``logprob_ref`` materialises the fp32 logits; ``kernels/logprob.py`` (Triton) and ``kernels/logprob_chunked.py``
(CPU, one slice of the vocabulary at a time) compute the same values and gradients without them, and both check
their inputs and shape their outputs with the helpers here.
"""
import torch

IGNORE_INDEX = -100


def _check(h, weight, targets, bias, temperature):
    """Shapes, dtypes and target range; raises with what was expected and what was found."""
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected h [..., D] and weight [V, D], got h {tuple(h.shape)} and "
                         f"weight {tuple(weight.shape)}: pass the LM-head weight, not its transpose")
    if h.dtype != weight.dtype:
        raise TypeError(f"h and weight must share a dtype, got {h.dtype} and {weight.dtype}: cast one")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"expected bias [{weight.shape[0]}], got {tuple(bias.shape)}")
    _check_targets(targets, h.shape[:-1], weight.shape[0], temperature)


def _check_targets(targets, row_shape, V, temperature):
    """Targets [...] int in [0, V) or IGNORE_INDEX, and T > 0. The range check runs on the targets' device
    (``torch._assert_async``: the host does not wait for it; on CUDA a failure is a device-side assert)."""
    if targets.shape != row_shape or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"expected integer targets of shape {tuple(row_shape)}, got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ok = (targets == IGNORE_INDEX) | ((targets >= 0) & (targets < V))
    torch._assert_async(ok.all(), f"targets must lie in [0, {V}) or equal {IGNORE_INDEX} (ignored), found one "
                                  "outside: check the tokenizer's vocabulary size")


def logprob_ref(h, weight, targets, bias=None, temperature=1.0, return_entropy=False):
    """Plain PyTorch definition. h: [..., D], weight: [V, D], bias: [V] or None, targets: [...].

    Returns logp [...] fp32 (0 where targets == -100), and the detached entropy [...] fp32 of
    softmax(logits) when ``return_entropy``. Materialises the fp32 logits [..., V].
    """
    _check(h, weight, targets, bias, temperature)
    logits = torch.nn.functional.linear(h.float(), weight.float(), None if bias is None else bias.float())
    return logprob_from_logits_ref(logits, targets, temperature, return_entropy)


def logprob_from_logits_ref(logits, targets, temperature=1.0, return_entropy=False):
    """Plain PyTorch definition on given logits [..., V] (any float dtype): as ``logprob_ref``."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)   # [..., V]
    ignored = targets == IGNORE_INDEX
    logp = logp_all.gather(-1, targets.clamp(min=0).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    entropy = torch.special.entr(logp_all.exp()).sum(-1)   # -sum_v p_v log p_v, with 0 log 0 = 0
    return logp, entropy.detach()


def _outputs(ctx, logp, entropy):
    """What the autograd.Functions return: logp, or (logp, entropy) with a non-differentiable entropy."""
    if entropy is None:
        return logp
    ctx.mark_non_differentiable(entropy)
    return logp, entropy


def _shaped(out, lead):
    """The [N] output(s) of an autograd.Function as ``lead``-shaped results: rows that already have that shape come
    back as they are, not as views (FSDP2 warns when a forward it wraps, the model's token_logprobs, returns a
    view: an in-place op on one would skip its pre-backward hook)."""
    if isinstance(out, tuple):
        return tuple(_shaped(o, lead) for o in out)
    return out if out.shape == lead else out.view(lead)


def _coef(g, targets, temperature):
    """Per-row factor of dz: g / T, and 0 on ignored rows. g: [N] -> [N] fp32."""
    return torch.where(targets == IGNORE_INDEX, 0.0, g.float() / temperature).contiguous()
