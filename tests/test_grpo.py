"""GRPO advantages, loss and one step's batch on hand-computed examples."""
import math

import pytest
import torch

from nanotorl.data import Problem
from nanotorl.generate import Completion
from nanotorl.grpo import (GRPOConfig, filler_micro_batch, group_advantages, grpo_batch, loss_normalizer, policy_loss,
                           uniform_groups)
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
