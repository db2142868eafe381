"""The hand-written Qwen2/Qwen3 against Hugging Face's, and its batched, packed and cached forwards against itself."""
import copy

import pytest
import torch

from conftest import interpreted, make_hf_checkpoint
from nanotorl.checkpoint import load_model
from nanotorl.model import KVCache, Qwen2, Qwen2Config

CONFIGS = {
    "untied-gqa2": dict(),
    "tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4, rope_theta=1_000_000.0),
    "gqa7-odd": dict(hidden_size=70, num_attention_heads=7, num_key_value_heads=1, intermediate_size=45,
                     rope_theta=500.0, num_hidden_layers=3),
    # Qwen3: q/k norms, no q/k/v bias, head_dim set apart from hidden/heads (wider, narrower, not a power of 2)
    "qwen3-untied-gqa2-hd24": dict(model_type="qwen3", head_dim=24),
    "qwen3-tied-gqa4-hd40": dict(model_type="qwen3", tie_word_embeddings=True, hidden_size=48, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=40, rope_theta=1_000_000.0),
    "qwen3-tied-mha-hd8": dict(model_type="qwen3", tie_word_embeddings=True, num_key_value_heads=4, head_dim=8),
}
# Largest |ours - HF| on logits of magnitude ~5 measured when the test was written: fp32 0 (bit-identical),
# bf16 0.115 (about 4 bf16 ulps at that magnitude: the two differ only in attention kernels' rounding).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.15}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, **CONFIGS[request.param])
    return hf, load_model(path, dtype=torch.float32).eval(), path


def logits_of(model, ids, **kw):
    with torch.no_grad():
        return model.logits(model(ids, **kw)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers(pair, dtype):
    hf, _, path = pair
    ours = load_model(path, dtype=dtype).eval()
    hf = copy.deepcopy(hf).to(dtype)  # the module's fp32 reference stays as it is
    ids = torch.randint(0, hf.config.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    got = logits_of(ours, ids)
    assert ref.abs().max() > 1.0, "weights too small for a meaningful comparison"
    torch.testing.assert_close(got, ref, atol=TOLERANCE[dtype], rtol=0)


def test_token_logprobs_match_transformers(pair):
    """The fused log-prob of each next token (as the trainer computes it) against log_softmax of HF's logits."""
    hf, ours, _ = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(5))
    targets = ids[:, 1:].clone()
    targets[1, -3:] = -100  # ignored positions: log-prob 0
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids[:, :-1]).logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        got = ours.token_logprobs(ids[:, :-1], targets).view_as(ref)
    ref[1, -3:] = 0.0
    assert ref.abs().max() > 1.0, "log-probs too flat for a meaningful comparison"
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_perturbed_weight_breaks_parity(pair):
    """Each architecture-specific weight matters: a q/k/v bias (Qwen2), a q-norm or k-norm weight (Qwen3)."""
    hf, ours, _ = pair
    attn = ours.layers[0].self_attn
    weights = [attn.q_norm.weight, attn.k_norm.weight] if ours.cfg.qk_norm else [attn.k_proj.bias, attn.q_proj.bias]
    ids = torch.randint(0, hf.config.vocab_size, (2, 9))
    with torch.no_grad():
        for w in weights:
            w[0] += 0.1
            try:
                assert (logits_of(ours, ids) - hf(ids).logits).abs().max() > 1e-3
            finally:
                w[0] -= 0.1
        torch.testing.assert_close(logits_of(ours, ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_padded_and_packed_rows_equal_unbatched(pair):
    _, model, _ = pair
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (7, 3, 11)]
    alone = [logits_of(model, s[None])[0] for s in seqs]

    # right-padded batch: pads get their own sequence id (-1) so nobody attends to them
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    seq_ids = torch.full((len(seqs), T), -1)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], seq_ids[i, :len(s)] = s, i
    padded = logits_of(model, ids, seq_ids=seq_ids)
    for i, s in enumerate(seqs):
        torch.testing.assert_close(padded[i, :len(s)], alone[i], atol=1e-5, rtol=0)

    # packed: all three in one row, positions restart per sequence
    packed_ids = torch.cat(seqs)[None]
    packed_seq = torch.cat([torch.full((len(s),), i) for i, s in enumerate(seqs)])[None]
    packed = logits_of(model, packed_ids, seq_ids=packed_seq)[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", [False, True], ids=["sdpa", "triton-decode"])
def test_kv_cache_decoding_equals_full_forward(pair, kernel, request):
    """Prefill then decode through the cache, with the decode step on SDPA or on the Triton kernel (under the
    interpreter on CPU), gives the logits of one full forward."""
    if kernel:
        interpreted("nanotorl.kernels.decode_attention")
        request.getfixturevalue("triton_interpreter")
    _, model, _ = pair
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (9, 5)]
    cache = KVCache(model.cfg, slots=4, max_len=16)
    slots = torch.tensor([3, 1])  # arbitrary slots, to catch slot/row mix-ups
    got = [[], []]
    with torch.no_grad():
        # prefill a chunk of 3 tokens per sequence, then decode one token at a time for both in one batch
        h = model(torch.stack([s[:3] for s in seqs]), positions=torch.arange(3).expand(2, 3), cache=cache, slots=slots)
        for i in range(2):
            got[i].append(model.logits(h[i]))
        for t in range(3, 9):
            live = [i for i in range(2) if t < len(seqs[i])]
            ids = torch.stack([seqs[i][t:t + 1] for i in live])
            h = model(ids, positions=torch.full((len(live), 1), t), cache=cache, slots=slots[live])
            for j, i in enumerate(live):
                got[i].append(model.logits(h[j]))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(torch.cat(got[i]), logits_of(model, s[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("slots", [[0, 1, 2], [3, 0, 2]], ids=["consecutive", "gathered"])
def test_decoding_rows_at_different_positions_see_only_their_own_prefix(pair, slots):
    """One-token rows at different positions in one forward, over a cache whose later positions hold other
    tokens' keys and values: each row's logits are those of its own sequence's full forward."""
    _, model, _ = pair
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in (6, 9, 7)]
    slots, start = torch.tensor(slots), [2, 5, 3]  # each sequence's prefilled length, then one token per forward
    cache = KVCache(model.cfg, slots=4, max_len=16)
    got = [[] for _ in seqs]
    with torch.no_grad():
        model(torch.randint(0, 97, (4, 16), generator=g), positions=torch.arange(16).expand(4, 16), cache=cache,
              slots=torch.arange(4))  # junk everywhere: a row that looked past its position would read it
        for s, slot, n in zip(seqs, slots, start):
            model(s[None, :n], positions=torch.arange(n)[None], cache=cache, slots=slot[None])
        for step in range(4):
            ids = torch.stack([s[n + step:n + step + 1] for s, n in zip(seqs, start)])  # [3, 1]
            positions = torch.tensor(start)[:, None] + step
            h = model(ids, positions=positions, cache=cache, slots=slots)
            for i in range(len(seqs)):
                got[i].append(model.logits(h[i]))
    for i, (s, n) in enumerate(zip(seqs, start)):
        torch.testing.assert_close(torch.cat(got[i]), logits_of(model, s[None, :n + 4])[0, n:], atol=1e-5, rtol=0)


def test_groups_of_rows_in_one_cached_forward_equal_separate_forwards(pair):
    """A prefill chunk of two slots and one decoding token of three others in one forward (the generator's
    step) give the hidden states of two separate forwards, and leave the same cache."""
    _, model, _ = pair
    g = torch.Generator().manual_seed(4)
    history = torch.randint(0, 97, (6, 5), generator=g)  # slots 0..5 hold 5 tokens each
    prefill_ids, decode_ids = torch.randint(0, 97, (2, 4), generator=g), torch.randint(0, 97, (3, 1), generator=g)
    prefill = (prefill_ids, torch.arange(5, 9).expand(2, 4), torch.tensor([4, 1]))
    decode = (decode_ids, torch.full((3, 1), 5), torch.tensor([2, 3, 5]))
    caches, outs = [], []
    for grouped in (False, True):
        cache = KVCache(model.cfg, slots=6, max_len=16)
        with torch.no_grad():
            model(history, positions=torch.arange(5).expand(6, 5), cache=cache, slots=torch.arange(6))
            if grouped:
                ids, positions, slots = (list(z) for z in zip(prefill, decode))
                outs.append(model(ids, positions=positions, cache=cache, slots=slots))
            else:
                outs.append([model(ids, positions=p, cache=cache, slots=s) for ids, p, s in (prefill, decode)])
        caches.append(cache)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(caches[0].k, caches[1].k, atol=1e-5, rtol=0)


def test_resumed_rows_read_their_prefix_in_place_on_a_junk_filled_cache(pair):
    """The generator's step after tool calls: slots resume (a chunk of tokens after prefixes of different lengths,
    in slots that are consecutive, evenly spaced, or neither, and a new prompt among them) while others decode,
    in one forward over a cache whose every position no slot wrote holds large junk. Each row's hidden states are
    those of its own sequence's full forward: no row reads past its prefix or another slot's memory."""
    _, model, _ = pair
    g = torch.Generator().manual_seed(6)
    resume, decode, T = {2: 7, 5: 3, 8: 11, 3: 0, 0: 6, 1: 5}, {7: 9, 4: 4}, 4  # slot: prefix length (in order)
    seqs = {s: torch.randint(0, 97, (n + T,), generator=g) for s, n in (resume | decode).items()}
    cache = KVCache(model.cfg, slots=10, max_len=24)
    written = torch.zeros(10, 24, dtype=torch.bool)  # [slots, max_len]
    with torch.no_grad():
        for s, n in (resume | decode).items():
            if n:
                model(seqs[s][None, :n], positions=torch.arange(n)[None], cache=cache, slots=torch.tensor([s]))
                written[s, :n] = True
        for c in (cache.k, cache.v):  # [layers, slots, Hkv, max_len, d]
            c.copy_(torch.where(written[None, :, None, :, None], c, 1e3 * torch.randn(c.shape, generator=g)))
        groups = [(resume, T), (decode, 1)]
        h = model([torch.stack([seqs[s][n:n + t] for s, n in rows.items()]) for rows, t in groups],
                  positions=[torch.tensor(list(rows.values()))[:, None] + torch.arange(t) for rows, t in groups],
                  cache=cache, slots=[torch.tensor(list(rows)) for rows, _ in groups])
        for out, (rows, t) in zip(h, groups):
            for row, (s, n) in zip(out, rows.items()):
                torch.testing.assert_close(row, model(seqs[s][None, :n + t])[0, n:], atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_same_gradients(pair):
    _, model, _ = pair
    ids = torch.randint(0, 97, (2, 8))
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.train()
        model.activation_checkpointing = flag
        model.logits(model(ids)).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    model.activation_checkpointing = False
    model.eval()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_init_weights_of_qwen3_has_unit_qk_norms_and_no_qkv_bias():
    """The demo-style initialisation also covers Qwen3's extra weights (q/k norms start at 1, as in transformers)."""
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, qkv_bias=False, qk_norm=True)
    model = Qwen2(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    attn = model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (4 * 12, 32) and attn.o_proj.weight.shape == (32, 4 * 12)
    assert attn.q_norm.weight.shape == (12,) and not any(n.endswith(".bias") for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.equal(p, torch.ones_like(p)), name
