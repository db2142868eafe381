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
    assert loss_normalizer(cfg, tokens=3, sequences=2, max_new_tokens=9) == 2
    assert loss_normalizer(GRPOConfig(), 3, 2, 9) == 3
    assert loss_normalizer(GRPOConfig(), 0, 0, 9) == 1.0  # a step with nothing to train divides by 1, not 0


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


# ------------------------------------------------------------------------------- the objective's variants


def test_dual_clip_caps_the_loss_of_negative_advantages_by_hand():
    cfg = GRPOConfig(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    logp = torch.log(torch.tensor([5.0, 2.0, 5.0, 0.5])).requires_grad_()
    old, mask = torch.zeros(4), torch.ones(4)
    adv = torch.tensor([-1.0, -1.0, 1.0, -0.5])
    loss, stats = policy_loss(logp, old, adv, mask, cfg, normalizer=4)
    # token 1: A < 0, ratio 5: the clipped loss max(5, 1.2) = 5 is capped at -A * C = 3; token 2: ratio 2, loss 2
    # (below the cap); token 3: A > 0, ratio 5 clipped to 1.2 -> -1.2 (no cap); token 4: max(0.25, 0.4) = 0.4
    assert loss.item() == pytest.approx((3 + 2 - 1.2 + 0.4) / 4)
    assert stats["dual_clipped"] == 1
    loss.backward()
    # the capped token is constant (no gradient), token 2 is -ratio * A / 4 = 0.5, tokens 3 and 4 are clipped
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, 0.5, 0.0, 0.0]))
    off, off_stats = policy_loss(logp, old, adv, mask, GRPOConfig(), normalizer=4)
    assert off.item() == pytest.approx((5 + 2 - 1.2 + 0.4) / 4) and off_stats["dual_clipped"] == 0
    for bad in (0.5, 1.0, -3.0):
        with pytest.raises(ValueError, match="--dual-clip must be 0 .off. or a bound above 1"):
            GRPOConfig(dual_clip=bad)


def test_constant_aggregation_by_hand():
    """Dr. GRPO: token losses summed, divided by responses x max_new_tokens, whatever the responses' lengths."""
    samples = [sample([1], [3, 4, 5], [1, 0, 1], [-0.1, 0.0, -0.3], 1.0),
               sample([1], [6], [1], [-0.5], -1.0)]
    cfg = GRPOConfig(group_size=2, std_normalize=False, aggregation="constant")
    batch = grpo_batch(samples, cfg, max_tokens=100)
    [mb] = batch.micro_batches
    assert mb["weight"].tolist() == [[1, 0, 0, 0], [1, 0, 1, 0]]  # no 1 / length, unlike 'sequence'
    normalizer = loss_normalizer(cfg, batch.tokens, batch.sequences, max_new_tokens=10)
    assert normalizer == 2 * 10
    loss, _ = policy_loss(mb["old_logp"].flatten(), mb["old_logp"].flatten(), mb["advantage"].flatten(),
                          mb["weight"].flatten(), cfg, normalizer)
    # ratio 1: every policy token's loss is -A; advantages +1 (2 policy tokens) and -1 (1 token)
    assert loss.item() == pytest.approx((-1 - 1 + 1) / 20)
    with pytest.raises(ValueError, match="aggregation must be 'token', 'sequence' or 'constant', got 'mean'"):
        GRPOConfig(aggregation="mean")


def flagged(reward, truncated=False, void_turn=False, length=2):
    s = sample([1], list(range(2, 2 + length)), [1] * length, [-0.5] * length, reward)
    s.truncated, s.void_turn = truncated, void_turn
    return s


def test_truncated_and_void_turn_responses_get_no_loss_but_count_in_their_groups_advantages():
    samples = [flagged(1.0, length=1), flagged(-1.0, truncated=True, length=2),       # group 1
               flagged(-1.0, void_turn=True, length=3), flagged(1.0, length=4)]      # group 2
    for mask_truncated, filter_void_turns, kept in ((False, False, [1, 2, 3, 4]), (True, False, [1, 3, 4]),
                                                    (False, True, [1, 2, 4]), (True, True, [1, 4])):
        cfg = GRPOConfig(group_size=2, std_normalize=False, mask_truncated=mask_truncated,
                         filter_void_turns=filter_void_turns, aggregation="sequence")
        batch = grpo_batch(samples, cfg, max_tokens=100)
        [mb] = batch.micro_batches
        rows = [int((row > 0).sum()) for row in mb["weight"]]  # policy tokens per row: the response's length
        assert (sorted(rows), batch.sequences, batch.tokens) == (kept, len(kept), sum(kept))
        # the advantages were computed with the whole group: +1 / -1 (mean 0), not 0 for a group of one
        advantage = {1: 1.0, 2: -1.0, 3: -1.0, 4: 1.0}  # by response length
        assert {n: float(a[0]) for n, a in zip(rows, mb["advantage"])} == {n: advantage[n] for n in kept}


def brute_force_loss(samples, cfg: GRPOConfig, delta, max_new_tokens: int) -> float:
    """The objective of the module docstring in float64, one response and one token at a time: ``delta(i, t)`` is
    the trainer's log-prob minus the generator's for token t of response i."""
    rewards = [s.reward for s in samples]
    losses, n_tokens = [], 0
    for i, s in enumerate(samples):
        group = rewards[i - i % cfg.group_size:][:cfg.group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        a = (s.reward - mean) / (std + 1e-6) if cfg.std_normalize else s.reward - mean
        if ((cfg.skip_uniform_groups and len(set(group)) == 1) or (cfg.mask_truncated and s.truncated)
                or (cfg.filter_void_turns and s.void_turn)):
            continue
        token_losses = []
        for t, m in enumerate(s.completion.loss_mask):
            if not m:
                continue
            ratio = math.exp(delta(i, t))
            loss = -min(ratio * a, min(max(ratio, 1 - cfg.clip_low), 1 + cfg.clip_high) * a)
            if cfg.dual_clip and a < 0:
                loss = min(loss, -a * cfg.dual_clip)
            token_losses.append(loss)
        n_tokens += len(token_losses)
        losses.append(sum(token_losses) / max(len(token_losses), 1) if cfg.aggregation == "sequence"
                      else sum(token_losses))
    divisor = {"token": n_tokens, "sequence": len(losses), "constant": len(losses) * max_new_tokens}
    return sum(losses) / max(divisor[cfg.aggregation], 1)


def random_samples(n: int, seed: int) -> list:
    """Responses of 1-12 tokens with tool tokens (mask 0), varied rewards, some truncated or with a void turn;
    each response's prompt starts with 100 + its index, so that a row of a micro-batch tells whose it is."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 13, (1,), generator=g))
        mask = (torch.rand(length, generator=g) > 0.25).long().tolist()
        logprobs = (-torch.rand(length, generator=g)).tolist()
        s = sample([100 + i, 1], torch.randint(1, 50, (length,), generator=g).tolist(), mask, logprobs,
                   float(torch.randint(0, 2, (1,), generator=g)) * 2 - 1)
        s.truncated, s.void_turn = bool(torch.rand(1, generator=g) < 0.3), bool(torch.rand(1, generator=g) < 0.3)
        out.append(s)
    return out


VARIANTS = {"default": {}, "sequence": {"aggregation": "sequence"},
            "constant": {"aggregation": "constant"},
            "dual clip": {"dual_clip": 2.0},
            "all": {"aggregation": "constant", "dual_clip": 1.5, "mask_truncated": True, "filter_void_turns": True,
                    "skip_uniform_groups": True, "clip_high": 0.28},
            "sequence, masked": {"aggregation": "sequence", "mask_truncated": True, "filter_void_turns": True}}


@pytest.mark.parametrize("variant", VARIANTS)
def test_objective_equals_brute_force_over_micro_batches_and_ranks(variant):
    """What train.py's train_step computes, with the step's responses split over 2 ranks and each rank's into
    micro-batches of at most 24 tokens (the normaliser from the counts summed over ranks), equals the objective
    computed one response at a time."""
    cfg = GRPOConfig(group_size=4, **VARIANTS[variant])
    samples, max_new_tokens = random_samples(24, seed=1), 16

    def delta(i, t):  # ratios from e^-1.5 to e^1.5, so that both clips and the dual clip bind somewhere
        return ((i * 7 + t * 3) % 11 - 5) * 0.3

    ranks = [grpo_batch(samples[:12], cfg, max_tokens=24), grpo_batch(samples[12:], cfg, max_tokens=24)]
    assert all(len(b.micro_batches) >= 2 for b in ranks)  # several micro-batches per rank
    normalizer = loss_normalizer(cfg, sum(b.tokens for b in ranks), sum(b.sequences for b in ranks), max_new_tokens)
    total = 0.0
    for mb in (mb for b in ranks for mb in b.micro_batches):
        old = mb["old_logp"]  # [B, T]: position p predicts token p + 1; the response starts at position P - 1 = 1
        shift = torch.tensor([[delta(int(row[0]) - 100, p - 1) for p in range(old.shape[1])]
                              for row in mb["input_ids"]])  # row[0]: 100 + the response's index
        loss, _ = policy_loss((old + shift).flatten(), old.flatten(), mb["advantage"].flatten(), mb["weight"].flatten(),
                              cfg, normalizer)
        total += loss.item()
    assert total == pytest.approx(brute_force_loss(samples, cfg, delta, max_new_tokens), abs=1e-6, rel=1e-5)


def policy_loss_on_main(logp, old_logp, advantages, mask, cfg, normalizer, ref_logp=None):
    """policy_loss as it was before the objective's variants (commit 10778df), verbatim: the default objective must
    stay bit for bit what it was."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if cfg.kl_coef and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.kl_coef * kl
    return (per_token * mask).sum() / normalizer


@pytest.mark.parametrize("settings", [{}, {"aggregation": "sequence"}, {"kl_coef": 0.05, "clip_high": 0.28},
                                      {"skip_uniform_groups": True, "std_normalize": False}])
def test_the_objective_without_the_new_options_is_bit_for_bit_what_it_was(settings):
    """Loss and gradient, exactly (torch.equal), against the code before the change, on a batch whose responses are
    flagged truncated and void (the flags are off, so they train as before) and whose ratios reach both clips."""
    cfg = GRPOConfig(group_size=4, **settings)
    samples = random_samples(24, seed=2)
    unflagged = [Sample(s.problem, s.completion, s.answer, s.correct, s.reward) for s in samples]
    batch, before = grpo_batch(samples, cfg, max_tokens=40), grpo_batch(unflagged, cfg, max_tokens=40)
    assert (batch.tokens, batch.sequences) == (before.tokens, before.sequences)
    normalizer = loss_normalizer(cfg, batch.tokens, batch.sequences, max_new_tokens=16)
    assert normalizer == (batch.tokens if cfg.aggregation == "token" else batch.sequences)
    g = torch.Generator().manual_seed(3)
    for mb, mb_before in zip(batch.micro_batches, before.micro_batches):
        assert all(torch.equal(mb[k], mb_before[k]) for k in mb)
        old, adv, w = mb["old_logp"].flatten(), mb["advantage"].flatten(), mb["weight"].flatten()
        logp = (old + torch.randn(old.shape, generator=g) * 0.5).requires_grad_()
        ref = old + torch.randn(old.shape, generator=g) * 0.1
        new, _ = policy_loss(logp, old, adv, w, cfg, normalizer, ref_logp=ref)
        (grad_new,) = torch.autograd.grad(new, logp)
        was = policy_loss_on_main(logp, old, adv, w, cfg, normalizer, ref_logp=ref)
        (grad_was,) = torch.autograd.grad(was, logp)
        assert torch.equal(new, was) and torch.equal(grad_new, grad_was)
