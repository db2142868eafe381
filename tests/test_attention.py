"""Attention over packed rows (nanotorl.attention): every path against the dense-mask path, in the model and alone;
the block mask against the token mask; positions against the pairwise count; memory that grows as T, not T^2."""
import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import LiveTensorBytes
from nanotorl import attention
from nanotorl.attention import FLEX_BLOCK, attend, attention_path, document_block_mask, pack, sequence_mask
from nanotorl.model import Qwen2, Qwen2Config

# FlexAttention warns that, uncompiled (as on CPU here), it is its unfused reference: that is what is compared.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# Sequence lengths of the two rows of a batch: 1, 2 and 5 sequences per row, sequences of length 1 among them,
# T = 300 (not a whole number of flex blocks); "split" holds one id in two places and pads (-1) at both ends.
ROWS = {
    "1-seq": [[300], [300]],
    "2-seq": [[1, 299], [150, 150]],
    "5-seq": [[70, 1, 129, 60, 40], [128, 128, 1, 1, 42]],
}


def seq_ids_of(rows):
    """[B, T] ids: sequence i of a row gets id i."""
    return torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in rows])


def split_ids():
    """Adversarial ids: pads at both ends, sequence 0 in two places around sequence 1, ids not in order."""
    row = [-1] * 5 + [0] * 100 + [1] * 90 + [0] * 50 + [3] * 1 + [2] * 44 + [-1] * 10
    return torch.tensor([row, list(reversed(row))])


CASES = {name: seq_ids_of(rows) for name, rows in ROWS.items()} | {"split": split_ids()}


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """FlexAttention refuses a backward on CPU; its eager backward is the plain reference that runs anywhere, so
    the check is lifted for the comparison (the compiled kernels are compared on a GPU: test_compiled_flex_on_gpu)."""
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)


def old_positions(seq_ids):
    """The pairwise definition: the number of earlier tokens of the same sequence in the row (a [B, T, T] tensor)."""
    return sequence_mask(seq_ids)[:, 0].sum(-1) - 1


class LargestTensor(TorchDispatchMode):
    """The element count of the largest tensor any op makes while active."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("case", list(CASES))
def test_positions_equal_the_pairwise_count(case):
    seq_ids = CASES[case]
    got = Qwen2._default_positions(torch.zeros_like(seq_ids), seq_ids)
    assert torch.equal(got, old_positions(seq_ids))
    random = torch.randint(-1, 4, (3, 200), generator=torch.Generator().manual_seed(0))  # ids all over the place
    assert torch.equal(Qwen2._default_positions(random, random), old_positions(random))


def test_positions_make_no_t_by_t_tensor():
    T = 4096
    seq_ids = seq_ids_of([[1000, 1, 3095]])
    with LargestTensor() as seen:
        Qwen2._default_positions(torch.zeros_like(seq_ids), seq_ids)
    assert seen.largest <= 2 * T, f"a tensor of {seen.largest} elements for a row of {T} tokens"


def qkv(seq_ids, Hq=4, Hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = seq_ids.shape
    return [torch.randn(B, T, H, d, generator=g, requires_grad=True) for H in (Hq, Hkv, Hkv)]


def attention_and_grads(q, k, v, fn):
    out = fn(q, k, v)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return [out, *torch.autograd.grad(out, (q, k, v), grad)]


@pytest.mark.parametrize("path", ["flex", "sdpa_varlen"])
@pytest.mark.parametrize("case", list(CASES))
def test_path_equals_dense_mask(case, path, monkeypatch, cpu_flex_backward):
    """Output and gradients of q, k and v of each path equal SDPA with the dense [B, 1, T, T] mask."""
    seq_ids = CASES[case]
    q, k, v = qkv(seq_ids)
    want = attention_and_grads(q, k, v, lambda *z: attention.sdpa(*z, sequence_mask(seq_ids)))
    monkeypatch.setenv("NANOTORL_ATTENTION", path)
    packing = pack(seq_ids, q.dtype)
    assert packing.path == path
    got = attention_and_grads(q, k, v, lambda *z: attend(*z, packing))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{path} {name}: {m}")


def test_one_flex_mask_function_per_row_shape_and_packings_used_in_any_order(monkeypatch, cpu_flex_backward):
    """The rows of every micro-batch of one shape share one mask function (a new closure per micro-batch could make
    torch 2.11 recompile FlexAttention for each), and a packing made before another of its shape still attends
    within its own sequences, forward and backward."""
    monkeypatch.setenv("NANOTORL_ATTENTION", "flex")
    first, second, other = CASES["2-seq"], CASES["5-seq"], CASES["5-seq"][:, :200]
    packings = [pack(ids, torch.float32) for ids in (first, second, other)]
    assert packings[0].block_mask.mask_mod is packings[1].block_mask.mask_mod
    assert packings[2].block_mask.mask_mod is not packings[0].block_mask.mask_mod
    for ids, packing in zip((first, second, other), packings):
        q, k, v = qkv(ids)
        want = attention_and_grads(q, k, v, lambda *z: attention.sdpa(*z, sequence_mask(ids)))
        got = attention_and_grads(q, k, v, lambda *z: attend(*z, packing))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def block_mask_as_tokens(block_mask, seq_ids):
    """The [B, T', T'] token mask a BlockMask stands for: full blocks all True, partial ones through its mask_mod."""
    B, n = block_mask.kv_num_blocks.shape[0], block_mask.kv_num_blocks.shape[-1]
    idx = torch.arange(n * FLEX_BLOCK)
    token = block_mask.mask_mod(torch.arange(B)[:, None, None], 0, idx[None, :, None], idx[None, None, :])
    out = torch.zeros(B, n * FLEX_BLOCK, n * FLEX_BLOCK, dtype=torch.bool)
    for counts, indices, full in ((block_mask.kv_num_blocks, block_mask.kv_indices, False),
                                  (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, True)):
        for b in range(B):
            for qb in range(n):
                for kb in indices[b, 0, qb, :counts[b, 0, qb]].tolist():
                    rows = slice(qb * FLEX_BLOCK, (qb + 1) * FLEX_BLOCK)
                    cols = slice(kb * FLEX_BLOCK, (kb + 1) * FLEX_BLOCK)
                    out[b, rows, cols] = True if full else token[b, rows, cols]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_block_mask_stands_for_the_token_mask(case):
    """Which blocks are computed (and which need the mask) gives exactly the dense mask: no block that holds a
    visible pair is skipped, no full block holds a hidden one."""
    seq_ids = CASES[case]
    T = seq_ids.shape[1]
    got = block_mask_as_tokens(document_block_mask(seq_ids), seq_ids)
    assert torch.equal(got[:, :T, :T], sequence_mask(seq_ids)[:, 0])


def test_block_mask_skips_the_blocks_between_sequences():
    """Three sequences of two blocks each: per sequence 2 partial blocks on the diagonal and 1 full one below;
    the 12 causal block pairs across sequences are never computed."""
    block_mask = document_block_mask(seq_ids_of([[2 * FLEX_BLOCK] * 3]))
    assert int(block_mask.kv_num_blocks.sum()) == 6 and int(block_mask.full_kv_num_blocks.sum()) == 3


def tiny_model(seed=0):
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=10000.0)
    return Qwen2(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, ids, seq_ids):
    model.zero_grad()
    logits = model.logits(model(ids, seq_ids=seq_ids))
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("path", ["flex", "sdpa_varlen"])
@pytest.mark.parametrize("case", list(CASES))
def test_packed_model_logits_and_gradients_equal_dense_path(case, path, monkeypatch, cpu_flex_backward):
    model = tiny_model()
    seq_ids = CASES[case]
    ids = torch.randint(0, 97, seq_ids.shape, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("NANOTORL_ATTENTION", "dense")
    want_logits, want_grads = logits_and_grads(model, ids, seq_ids)
    monkeypatch.setenv("NANOTORL_ATTENTION", path)
    logits, grads = logits_and_grads(model, ids, seq_ids)
    assert want_logits.abs().max() > 1.0, "logits too flat for a meaningful comparison"
    for name, got, want in [("logits", logits, want_logits)] + [(f"d{n}", g, want_grads[n]) for n, g in grads.items()]:
        scale = float(want.abs().max())   # fp32 rounding: 1e-5 of the tensor's largest entry
        torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=0, msg=lambda m: f"{path} {name}: {m}")


def test_packed_forward_memory_grows_as_t_not_t_squared():
    """Peak memory of a packed training forward (tensors PyTorch allocates, counted by LiveTensorBytes) at 4x the
    row length is about 4x, not 16x: no [T, T] mask and no [T, T] position comparison."""
    model = tiny_model()

    def peak(T):
        seq_ids = seq_ids_of([[500] * (T // 500) + [T % 500]])
        ids = torch.zeros_like(seq_ids)
        with LiveTensorBytes() as live:
            model(ids, seq_ids=seq_ids)
        return live.peak

    small, large = peak(2048), peak(8192)
    assert large < 6 * small, f"peak {small / 2**20:.1f} MiB at T=2048, {large / 2**20:.1f} MiB at T=8192"


def test_attention_path_choice(monkeypatch):
    monkeypatch.delenv("NANOTORL_ATTENTION", raising=False)
    flash = attention.flash_varlen()[0] is not None
    assert attention_path("cpu", torch.float32, 512)[0] == "dense"
    assert attention_path("cpu", torch.bfloat16, 16384)[0] == "sdpa_varlen"
    assert attention_path("cuda", torch.float32, 16384)[0] == "flex"
    assert attention_path("cuda", torch.bfloat16, 16384)[0] == ("flash_attn" if flash else "flex")
    assert attention_path("cuda", torch.bfloat16, 512)[0] == ("flash_attn" if flash else "dense")
    monkeypatch.setenv("NANOTORL_ATTENTION", "sdpa_varlen")
    assert attention_path("cpu", torch.float32, 64) == ("sdpa_varlen", "forced by NANOTORL_ATTENTION")
    monkeypatch.setenv("NANOTORL_ATTENTION", "flash")
    with pytest.raises(ValueError, match="must be one of"):
        attention_path("cpu", torch.float32, 64)


def gpu_comparison(path, dtype, atol):
    """On CUDA: the path against the dense mask, output and gradients, on every case."""
    for case, seq_ids in CASES.items():
        seq_ids = seq_ids.cuda()
        q, k, v = (z.detach().to("cuda", dtype).requires_grad_() for z in qkv(seq_ids, Hq=12, Hkv=2, d=128))
        want = attention_and_grads(q, k, v, lambda *z: attention.sdpa(*z, sequence_mask(seq_ids)))
        packing = pack(seq_ids, dtype)
        assert packing.path == path
        got = attention_and_grads(q, k, v, lambda *z: attend(*z, packing))
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the compiled FlexAttention kernels")
def test_compiled_flex_on_gpu(monkeypatch):
    monkeypatch.setenv("NANOTORL_ATTENTION", "flex")
    gpu_comparison("flex", torch.float32, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attn_varlen_func needs a CUDA device")
@pytest.mark.skipif(attention.flash_varlen()[0] is None, reason=str(attention.flash_varlen()[1]))
def test_flash_attn_varlen_equals_dense_mask(monkeypatch):
    monkeypatch.setenv("NANOTORL_ATTENTION", "flash_attn")
    gpu_comparison("flash_attn", torch.bfloat16, atol=2e-2)
