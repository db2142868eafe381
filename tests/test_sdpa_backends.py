"""No attention call on the CUDA path falls to SDPA's math kernel, checked on CPU.

SDPA on CUDA picks, in order, flash attention, the memory-efficient kernel (or cuDNN) and last the math kernel,
which materialises fp32 [B, Hq, T, S] scores. Which one a call can take follows from its arguments alone;
:func:`cuda_backends` writes down the documented constraints (PyTorch's sdp_utils: ``use_flash_attention`` and
``use_mem_efficient_attention``; cuDNN is left out, so the check is conservative). The model's forwards run on CPU
with the library's CUDA test (``nanotorl.attention._cuda``) answering yes, and every SDPA call is recorded and
checked: the prefill and tool-output chunks of a cached forward, packed rows of up to DENSE_MAX_T tokens (the
dense path) and right-padded rows (plain causal). Their outputs must equal those of the CPU path.
"""
import pytest
import torch
import torch.nn.functional as F

from nanotorl import attention
from nanotorl.model import KVCache, Qwen2, Qwen2Config

HALF = (torch.float16, torch.bfloat16)


def cuda_backends(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **_) -> set[str]:
    """The fused CUDA kernels that SDPA may run a call on (an empty set: only math). q: [B, Hq, T, d],
    k/v: [B, Hkv, S, d]."""
    d, Hq, Hk, Hv = q.shape[-1], q.shape[1], k.shape[1], v.shape[1]
    dense = all(z.dim() == 4 and z.stride(-1) == 1 for z in (q, k, v))
    grouped = enable_gqa and Hk == Hv and Hq % Hk == 0   # flash's check_batch_size_and_num_heads_dense<true>
    ok = set()
    if dense and attn_mask is None and q.dtype in HALF and d <= 256 and d % 8 == 0 and (Hq == Hk == Hv or grouped):
        ok.add("flash")  # no mask at all (is_causal is its only masking)
    if dense and q.dtype in HALF + (torch.float32,) and d % (8 if q.dtype in HALF else 4) == 0 and Hq == Hk == Hv:
        ok.add("efficient")  # any mask, but the same number of query, key and value heads (no grouped query)
    return ok


def test_constraints_reject_a_masked_grouped_query_call():
    q, k = torch.randn(2, 4, 3, 16, dtype=torch.bfloat16), torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    assert cuda_backends(q, k, k, mask, enable_gqa=True) == set()
    assert cuda_backends(q, k, k, None, is_causal=True, enable_gqa=True) == {"flash"}
    wide = k.repeat_interleave(2, dim=1)
    assert cuda_backends(q, wide, wide, mask) == {"efficient"}
    assert cuda_backends(q.float(), wide.float(), wide.float(), mask) == {"efficient"}


@pytest.fixture
def model():
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # head_dim 16, two query heads per KV head
    return Qwen2(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).eval()


def forwards(model):
    """The model's SDPA users: prefill chunks of two slots, a tool-output chunk after them, packed rows, padded
    rows; returns their outputs."""
    dev = model.embed_tokens.weight.device
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1)).to(dev)
    cache = KVCache(model.cfg, slots=3, max_len=24, device=dev, dtype=torch.bfloat16)
    slots = torch.tensor([2, 0], device=dev)
    positions = torch.arange(12, device=dev).expand(2, 12)
    out = [model(ids[:, :8], positions=positions[:, :8], cache=cache, slots=slots),
           model(ids[:, 8:], positions=positions[:, 8:], cache=cache, slots=slots)]
    seq_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3], device=dev)
    out.append(model(ids.view(2, 12)[:1], seq_ids=seq_ids))
    out.append(model(ids))
    return out


def test_no_cuda_attention_call_selects_the_math_kernel(model, monkeypatch):
    monkeypatch.delenv("NANOTORL_ATTENTION", raising=False)
    with torch.no_grad():
        want = forwards(model)
    calls, real = [], F.scaled_dot_product_attention

    def recorded(q, k, v, **kw):
        calls.append(((q, k, v), kw))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention, "_cuda", lambda t: True)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    with torch.no_grad():
        got = forwards(model)
    runs = 2  # a cached forward calls SDPA once per run of evenly spaced slots (model.runs): slots [2, 0], two
    assert len(calls) == (2 * runs + 2) * model.cfg.num_hidden_layers
    for (q, k, v), kw in calls:
        assert cuda_backends(q, k, v, **kw), (f"SDPA would run on the math kernel: q {tuple(q.shape)} {q.dtype}, "
                                             f"k {tuple(k.shape)}, mask {kw['attn_mask'] is not None}, "
                                             f"enable_gqa {kw['enable_gqa']}")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to run SDPA's fused kernels")
def test_cuda_forwards_run_with_the_math_kernel_disabled(model, monkeypatch):
    """On a GPU, the same forwards with SDPA's math kernel switched off: any call that needs it raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    monkeypatch.delenv("NANOTORL_ATTENTION", raising=False)
    monkeypatch.setenv("NANOTORL_KERNELS", "torch")  # the cached forwards through SDPA, not the decode kernel
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with torch.no_grad(), sdpa_kernel(fused):
        out = forwards(model.cuda())
    assert all(torch.isfinite(o).all() for o in out)
