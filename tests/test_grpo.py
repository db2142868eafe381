"""GRPO advantages, loss and one step's batch on hand-computed examples."""
import math

import pytest
import torch

from nanotorl.data import Problem
from nanotorl.generate import Completion
from nanotorl.grpo import (GRPOConfig, filler_micro_batch, group_advantages, grpo_batch, loss_normalizer, micro_batches,
                           policy_loss, policy_sequence, row_length, uniform_groups)
from nanotorl.rollout import Sample


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean -0.5, unbiased std sqrt((1.5^2 + 3 * 0.5^2) / 3) = 1; group 2: all equal -> 0
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(r, 4, std_normalize=False),
                               torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), 2, std_normalize=False),
                               torch.tensor([1.0, -1.0]))
    assert uniform_groups(r, 4).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_policy_loss_by_hand():
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.2)
    logp = torch.tensor([-1.0, -2.0, math.log(2) - 1, math.log(2) - 1], requires_grad=True)
    old = torch.tensor([-1.0, -1.5, -1.0, -1.0])
    adv = torch.tensor([1.5, 1.5, 1.5, -0.5])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is tool output
    loss, stats = policy_loss(logp, old, adv, mask, cfg, normalizer=3)
    # token 1: ratio 1 -> -1.5; token 2: ratio e^-0.5 (below the clip, unclipped is smaller) -> -1.5 e^-0.5;
    # token 3: ratio 2 clipped to 1.2 -> -1.8
    expected = (-1.5 - 1.5 * math.exp(-0.5) - 1.8) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clipped"] == 1
    loss.backward()
    # d/dlogp of -ratio*A = -ratio*A/3 where unclipped, 0 where clipped, and nothing through the tool token
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, -0.5 * math.exp(-0.5), 0.0, 0.0]))


def test_clip_higher_uses_separate_bounds():
    logp = torch.log(torch.tensor([1.25, 0.75]))
    old = torch.zeros(2)
    mask = torch.ones(2)
    adv = torch.tensor([1.0, -1.0])
    sym, _ = policy_loss(logp, old, adv, mask, GRPOConfig(clip_low=0.2, clip_high=0.2), normalizer=2)
    dapo, _ = policy_loss(logp, old, adv, mask, GRPOConfig(clip_low=0.2, clip_high=0.28), normalizer=2)
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert dapo.item() == pytest.approx((-1.25 + 0.8) / 2)


def test_kl_term_uses_low_variance_estimator():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    cfg = GRPOConfig(kl_coef=0.1)
    loss, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1), cfg, normalizer=1, ref_logp=ref)
    k3 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx(0.1 * k3) and stats["kl"] == pytest.approx(k3)


def sample(prompt, response, mask, logprobs, reward):
    completion = Completion(prompt, response, mask, logprobs, [], "eos")
    return Sample(Problem("p", "", ""), completion, None, reward > 0, reward)


def test_grpo_batch_by_hand():
    """Two groups of two; the second has equal rewards. Each kept response becomes one row, position t predicting
    token t + 1, with the response's advantage on every token and weight on the policy's own tokens only."""
    samples = [sample([1, 2], [3, 4, 5], [1, 0, 1], [-0.1, 0.0, -0.3], 1.0),
               sample([1, 2], [6], [1], [-0.5], -1.0),
               sample([7], [8, 9], [1, 1], [-0.2, -0.4], 1.0),
               sample([7], [9], [1], [-0.6], 1.0)]
    cfg = GRPOConfig(group_size=2, std_normalize=False, skip_uniform_groups=True, aggregation="sequence")
    batch = grpo_batch(samples, cfg, max_tokens=100)
    assert (batch.sequences, batch.tokens) == (2, 3)  # the uniform group is skipped; tool token 4 has no weight
    [mb] = batch.micro_batches  # rows sorted by length, right-padded
    assert mb["input_ids"].tolist() == [[1, 2, 6, 0, 0], [1, 2, 3, 4, 5]]
    assert mb["targets"].tolist() == [[2, 6, -100, -100, -100], [2, 3, 4, 5, -100]]
    assert mb["advantage"].tolist() == [[-1.0] * 3 + [0.0] * 2, [1.0] * 5]
    assert mb["weight"].tolist() == [[0, 1, 0, 0, 0], [0, 0.5, 0, 0.5, 0]]  # sequence mean: 1 / policy tokens
    torch.testing.assert_close(mb["old_logp"], torch.tensor([[0, -0.5, 0, 0, 0], [0, -0.1, 0, -0.3, 0]]))
    kept_all = grpo_batch(samples, GRPOConfig(group_size=2), max_tokens=100)
    assert (kept_all.sequences, kept_all.tokens) == (4, 6)
    assert loss_normalizer(cfg, tokens=3, sequences=2) == 2 and loss_normalizer(GRPOConfig(), 3, 2) == 3
    assert loss_normalizer(GRPOConfig(), 0, 0) == 1.0  # a step with nothing to train divides by 1, not 0


def test_filler_micro_batch_has_no_loss_and_no_gradient():
    mb = filler_micro_batch()
    assert mb["input_ids"].shape == (1, 2) and mb["weight"].sum() == 0
    logp = torch.tensor([-1.5, -0.5], requires_grad=True)
    loss, stats = policy_loss(logp, mb["old_logp"].flatten(), mb["advantage"].flatten(), mb["weight"].flatten(),
                              GRPOConfig(), normalizer=1)
    loss.backward()
    assert loss.item() == 0 and not logp.grad.any() and stats["clipped"] == 0


def test_packed_micro_batches_by_hand():
    """Three sequences of 5, 2 and 3 tokens in rows of at most 8: first fit, longest first, gives rows (5, 3) and
    (2); every row is padded to 128 tokens (the smallest row length for this budget) with an id of its own."""
    seqs = [policy_sequence([1, 2], [3, 4, 5], [1, 0, 1], [-0.1, 0.0, -0.3], 1.0),
            policy_sequence([6], [7], [1], [-0.5], -1.0),
            policy_sequence([8], [9, 10], [1, 1], [-0.2, -0.4], 0.5)]
    first, second = micro_batches(seqs, max_tokens=8, pack=True)
    pads = 128 - 8
    assert first["input_ids"].tolist() == [[1, 2, 3, 4, 5, 8, 9, 10] + [0] * pads]
    assert first["targets"].tolist() == [[2, 3, 4, 5, -100, 9, 10, -100] + [-100] * pads]
    assert first["seq_ids"].tolist() == [[0] * 5 + [1] * 3 + [2] * pads]
    assert first["advantage"].tolist() == [[1.0] * 5 + [0.5] * 3 + [0.0] * pads]
    assert first["weight"].tolist() == [[0, 1, 0, 1, 0, 1, 1, 0] + [0] * pads]
    assert second["input_ids"].tolist() == [[6, 7] + [0] * 126] and second["seq_ids"].tolist() == [[0] * 2 + [1] * 126]
    assert [row_length(n, 16384) for n in (1, 2048, 2049, 5000, 16384, 16385)] == [2048, 2048, 4096, 8192, 16384,
                                                                                   18432]


def test_packed_rows_hold_every_token_once_in_few_lengths():
    """Random batches: every sequence is in exactly one row, in one piece, rows stay within the budget (but for a
    sequence longer than it, alone), and all rows of all batches take at most 4 lengths (reused compiled shapes)."""
    g = torch.Generator().manual_seed(0)
    shapes = set()
    for step in range(20):
        lengths = torch.randint(1, 3500, (int(torch.randint(1, 40, (), generator=g)),), generator=g).tolist()
        if step == 0:
            lengths.append(20000)  # longer than the budget
        seqs = [{"input_ids": [i] * n, "targets": [i] * n} for i, n in enumerate(lengths)]
        found = []
        for mb in micro_batches(seqs, 16384, pack=True):
            ids, seq_ids = mb["input_ids"][0], mb["seq_ids"][0]
            shapes.add(ids.shape[0])
            real = mb["targets"][0] != -100   # pads: target -100; every token of these sequences has a target
            assert real.sum() <= 16384 or seq_ids.max() == 1
            for s in seq_ids[real].unique():
                values = ids[seq_ids == s]
                assert (values == values[0]).all() and (seq_ids == s).nonzero().diff(dim=0).eq(1).all()
                found.append((int(values[0]), len(values)))
        assert sorted(found) == list(enumerate(lengths))
    assert shapes - {20480} <= {2048, 4096, 8192, 16384}


@pytest.mark.parametrize("max_tokens", [256, 2048])
def test_packed_rows_give_the_padded_loss_and_gradients(max_tokens):
    """The loss and every gradient of a step over packed rows equal those over right-padded rows, fp32 rounding
    apart: rows of up to 1,024 tokens take the dense-mask attention (budget 256), longer ones causal SDPA per
    sequence (budget 2048: one row of 2,048)."""
    from nanotorl.attention import DENSE_MAX_T
    from nanotorl.model import Qwen2, Qwen2Config
    model = Qwen2(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)).init_weights(std=0.2)
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, n in enumerate([1, 7, 40, 130, 3, 90, 1, 250, 60, 18, 400, 300]):
        mask = [1] * n
        mask[n // 3: n // 2] = [0] * (n // 2 - n // 3)  # a tool output
        seqs.append(policy_sequence(torch.randint(1, 50, (3 + i,), generator=g).tolist(),
                                    torch.randint(1, 50, (n,), generator=g).tolist(), mask,
                                    (-torch.rand(n, generator=g)).tolist(), float(i % 3 - 1)))

    def step(pack):
        model.zero_grad()
        total = 0.0
        for mb in micro_batches(seqs, max_tokens, pack):
            logp = model.token_logprobs(mb["input_ids"], mb["targets"], seq_ids=mb.get("seq_ids"))
            loss, _ = policy_loss(logp, mb["old_logp"].flatten(), mb["advantage"].flatten(), mb["weight"].flatten(),
                                  GRPOConfig(), normalizer=100)
            loss.backward()
            total += float(loss.detach())
        return total, {name: p.grad.clone() for name, p in model.named_parameters()}

    padded, packed = step(False), step(True)
    rows = [mb["input_ids"].shape[1] for mb in micro_batches(seqs, max_tokens, True)]
    assert len(rows) < len(micro_batches(seqs, max_tokens)) and (max(rows) > DENSE_MAX_T) == (max_tokens > DENSE_MAX_T)
    assert packed[0] == pytest.approx(padded[0], rel=1e-5) and abs(padded[0]) > 0.1
    for name, grad in packed[1].items():
        scale = float(padded[1][name].abs().max())   # fp32 rounding: 1e-5 of the largest entry
        torch.testing.assert_close(grad, padded[1][name], atol=1e-5 * scale, rtol=0, msg=name)


def test_packed_rows_compile_flex_attention_once_per_length(monkeypatch):
    """Compiled FlexAttention over the packed rows of many steps (random lengths, budget 1,024) is traced once per
    row length, at most 4 times, though the rows' block masks differ: the compiles are reused step after step.
    The CPU stands in for CUDA with a backend that counts compiles (Dynamo's guards, which decide when it recompiles,
    are the same whatever the backend); without the fixed lengths the rows would take up to 8 shapes."""
    from torch.nn.attention.flex_attention import flex_attention

    from nanotorl import attention
    traced = []

    def counting(graph, inputs):
        traced.append(graph)
        return graph.forward

    monkeypatch.setattr(attention, "flex_attention", torch.compile(flex_attention, backend=counting, dynamic=False))
    monkeypatch.setenv("NANOTORL_ATTENTION", "flex")
    g = torch.Generator().manual_seed(0)
    lengths = set()
    for _ in range(8):
        sizes = torch.randint(1, 400, (int(torch.randint(2, 12, (), generator=g)),), generator=g).tolist()
        for mb in micro_batches([{"input_ids": [1] * n, "targets": [1] * n} for n in sizes], 1024, pack=True):
            seq_ids = mb["seq_ids"]
            q, k, v = (torch.randn(1, seq_ids.shape[1], H, 16, generator=g) for H in (4, 2, 2))   # [1, T, H, d]
            attention.attend(q, k, v, attention.pack(seq_ids, q.dtype))
            lengths.add(seq_ids.shape[1])
    assert len(traced) == len(lengths) and lengths <= {128, 256, 512, 1024}, (len(traced), sorted(lengths))
