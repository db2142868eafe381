"""GRPO: group-normalised advantages and the clipped policy loss, on one screen.

For a prompt with G sampled responses and rewards r_1..r_G, every token of response i gets the advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)        (std normalisation optional: Dr. GRPO drops it)

and the policy minimises, over the tokens t the policy sampled (tool-output tokens are masked out),

    L = -agg_t min( rho_t A,  clip(rho_t, 1 - eps_low, 1 + eps_high) A ),    rho_t = exp(logp_t - logp_old_t)

with separate low/high clip ranges (DAPO's clip-higher). ``agg`` is the token mean over the whole batch by
default, or the mean over sequences of each sequence's token mean. The optional KL to a frozen reference uses
the low-variance estimator  k3 = exp(ref - logp) - (ref - logp) - 1  (coefficient 0 by default, as in ToRL).

logp_old is the log-prob the generator computed while sampling: the generator and the trainer run the same model
code, so no second forward is needed, and the gap between the two is measured on the first micro-batch.
"""
from dataclasses import dataclass

import torch


@dataclass
class GRPOConfig:
    group_size: int = 8              # G: responses per prompt, whose rewards are compared with each other
    clip_low: float = 0.2
    clip_high: float = 0.2
    std_normalize: bool = True
    aggregation: str = "token"       # 'token' | 'sequence'
    kl_coef: float = 0.0
    skip_uniform_groups: bool = False  # drop groups whose rewards are all equal (they carry no signal)

    def __post_init__(self):
        if self.aggregation not in ("token", "sequence"):
            raise ValueError(f"aggregation must be 'token' or 'sequence', got {self.aggregation!r}")


def group_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards: [P * G], consecutive groups of ``group_size`` -> advantages [P * G]."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if std_normalize:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.flatten()


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P * G] bool: True for every member of a group whose rewards are all equal."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(-1).repeat_interleave(group_size)


def policy_loss(logp, old_logp, advantages, mask, cfg: GRPOConfig, normalizer: float, ref_logp=None):
    """Sum of the clipped surrogate over the masked tokens, divided by ``normalizer``.

    logp, old_logp, mask: [N] per token (mask 1 where the policy sampled the token); advantages: [N] (the
    sequence's advantage broadcast to its tokens). For token aggregation ``normalizer`` is the number of masked
    tokens in the whole (global) batch; for sequence aggregation each token must already carry the weight
    1 / (its sequence's masked length) in ``mask`` and ``normalizer`` is the number of sequences. Dividing by a
    global count keeps the gradient exact under micro-batching and data parallelism.
    Returns (loss, stats) where stats holds sums for logging: clipped tokens and KL.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats = {"clipped": float(((clipped < unclipped) & (mask > 0)).sum())}
    if cfg.kl_coef and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.kl_coef * kl
        stats["kl"] = float((kl.detach() * (mask > 0)).sum())
    return (per_token * mask).sum() / normalizer, stats


def micro_batches(sequences: list[dict], max_tokens: int) -> list[dict]:
    """Group sequences into right-padded micro-batches [B, T] of at most ``max_tokens`` (B * T) tokens.

    Each sequence is a dict of equal-length per-token lists; ``input_ids`` and ``targets`` (-100: no loss)
    are required, pads get id 0, target -100 and 0 elsewhere. Sequences are sorted by length first so rows
    of a micro-batch are alike and padding stays small. Right padding keeps plain causal attention exact
    for the real tokens (they never look ahead at pads). A sequence longer than ``max_tokens`` gets a
    micro-batch of its own.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
    groups, current = [], []
    for i in order:
        longest = len(sequences[i]["input_ids"])  # sorted: the newcomer is the longest
        if current and (len(current) + 1) * longest > max_tokens:
            groups.append(current)
            current = []
        current.append(sequences[i])
    if current:
        groups.append(current)
    out = []
    for group in groups:
        T = len(group[-1]["input_ids"])
        pad = {k: (-100 if k == "targets" else 0) for k in group[0]}
        out.append({k: torch.tensor([s[k] + [pad[k]] * (T - len(s[k])) for s in group]) for k in group[0]})
    return out


def policy_sequence(prompt_ids, response_ids, loss_mask, old_logprobs, advantage: float,
                    aggregation: str = "token") -> dict:
    """One response as per-token training lists, aligned so that position t predicts token t + 1.

    ``weight`` is the loss mask of the predicted token (0 on the prompt and on tool output); with sequence
    aggregation it is divided by the number of policy tokens, so every sequence weighs the same.
    """
    ids = list(prompt_ids) + list(response_ids)
    P, n = len(prompt_ids), max(sum(loss_mask), 1)
    scale = 1.0 / n if aggregation == "sequence" else 1.0
    pad = [0.0] * (P - 1)
    return {"input_ids": ids, "targets": ids[1:] + [-100],
            "weight": pad + [m * scale for m in loss_mask] + [0.0],
            "old_logp": pad + list(old_logprobs) + [0.0],
            "advantage": [advantage] * len(ids)}
