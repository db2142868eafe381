"""GRPO advantages and loss on hand-computed examples."""
import math

import pytest
import torch

from nanotorl.grpo import GRPOConfig, group_advantages, policy_loss, uniform_groups


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
