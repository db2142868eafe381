"""GRPO: group-normalised advantages and the clipped policy loss, on one screen.

For a prompt with G sampled responses and rewards r_1..r_G, every token of response i gets the advantage

    A_i = (r_i - mean(r)) / (std(r) + eps)        (std normalisation optional: Dr. GRPO drops it)

and the policy minimises, over the tokens t the policy sampled (tool-output tokens are masked out),

    L = -agg_t min( rho_t A,  clip(rho_t, 1 - eps_low, 1 + eps_high) A ),    rho_t = exp(logp_t - logp_old_t)

with separate low/high clip ranges (DAPO's clip-higher). Dual clip (``dual_clip`` C > 1, verl's ``clip_ratio_c``):
for a negative advantage the token's loss is also capped at -A * C, so that a huge ratio on a token the policy
should avoid cannot make the loss (and its gradient) unbounded; where the cap applies the token has no gradient.
``agg`` over the policy tokens of the batch (l_it the token losses, n_i the policy tokens of response i, B the
responses, L = ``max_new_tokens``):

    'token'    (default)   sum_it l_it / sum_i n_i         the token mean over the whole batch (DAPO)
    'sequence'             sum_i (sum_t l_it / n_i) / B    the mean over responses of each one's token mean
    'constant' (Dr. GRPO)  sum_it l_it / (B * L)           no length in the normaliser (verl's seq-mean-token-sum-norm)

B and n_i count only the responses the loss sees: a group left out (``skip_uniform_groups``) and a response given
zero loss weight are in neither. Zero loss weight goes, with ``mask_truncated``, to responses cut by the token
budget without a final answer (DAPO's overlong filtering) and, with ``filter_void_turns``, to responses with a
void turn (SimpleTIR; the rule is in :mod:`nanotorl.rollout`); their rewards still count in their group's
advantages. The optional KL to a frozen reference uses the low-variance estimator
k3 = exp(ref - logp) - (ref - logp) - 1  (coefficient 0 by default, as in ToRL).

logp_old is the log-prob the generator computed while sampling: the generator and the trainer run the same model
code, so no second forward is needed, and the gap between the two is logged (``LossStats``).

One step's batch (:func:`grpo_batch`): samples -> advantages -> per-token sequences -> micro-batches, either one
response per row, right-padded, or several packed into each row (``seq_ids`` keeps their attention apart); each
token's loss is the same either way.
"""
from dataclasses import dataclass

import torch

from nanotorl.attention import FLEX_BLOCK
from nanotorl.flags import Checked, Valid, at_least, one_of, option


AGGREGATIONS = ("token", "sequence", "constant")


@dataclass
class GRPOConfig(Checked):
    """groups, advantages and the loss"""
    group_size: int = option(8, "G: responses per prompt, whose rewards are compared with each other",
                             at_least(2, "at least 2 (a group of one has no spread to compare with)"), "responses")
    clip_low: float = option(0.2, "eps_low: the ratio is clipped below at 1 - eps_low",
                             Valid("from 0 to below 1", lambda v: 0 <= v < 1, 1))
    clip_high: float = option(0.2, "eps_high: the ratio is clipped above at 1 + eps_high (DAPO's clip-higher)",
                              at_least(0))
    dual_clip: float = option(0.0, "C: cap the loss of a token with A < 0 at -A * C (verl's clip_ratio_c); 0 = off",
                              Valid("0 (off) or a bound above 1 on the ratio of a token with a negative advantage "
                                    "(verl's clip_ratio_c, 3 there)", lambda v: v == 0 or v > 1, 0.5))
    std_normalize: bool = option(True, "divide the advantages by the group's standard deviation (Dr. GRPO: off)")
    aggregation: str = option("token", "how token losses become the loss: module docstring",
                              one_of(*AGGREGATIONS))
    kl_coef: float = option(0.0, "weight of the KL penalty to the reference policy (0 = none, as in ToRL)",
                            at_least(0))
    skip_uniform_groups: bool = option(False, "drop groups whose rewards are all equal (they carry no signal)")
    mask_truncated: bool = option(False, "zero loss weight for responses cut by the budget without an answer (DAPO)")
    filter_void_turns: bool = option(False, "zero loss weight for responses with a void turn (SimpleTIR, "
                                            "nanotorl.rollout)")


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
    1 / (its sequence's masked length) in ``mask`` and ``normalizer`` is the number of sequences; for constant
    aggregation it is the number of sequences x ``max_new_tokens`` (:func:`loss_normalizer`). Dividing by a global
    count keeps the gradient exact under micro-batching and data parallelism.
    Returns (loss, stats) where stats holds sums for logging: clipped tokens, tokens the dual clip capped, KL; each a
    0-dim tensor on the device (read back once per step: :class:`LossStats`).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    on = mask > 0
    zero = per_token.new_zeros(())
    stats = {"clipped": ((clipped < unclipped) & on).sum(), "dual_clipped": zero, "kl": zero}
    if cfg.dual_clip:
        cap = -cfg.dual_clip * advantages  # binds only where A < 0 (there it is positive)
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        stats["dual_clipped"] = (capped & on).sum()
    if cfg.kl_coef and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + cfg.kl_coef * kl
        stats["kl"] = torch.where(on, kl.detach(), 0.0).sum()
    return (per_token * mask).sum() / normalizer, stats


def micro_batches(sequences: list[dict], max_tokens: int, pack: bool = False) -> list[dict]:
    """Group sequences into right-padded micro-batches [B, T] of at most ``max_tokens`` (B * T) tokens, or with
    ``pack`` into packed rows (:func:`packed_micro_batches`).

    Each sequence is a dict of equal-length per-token lists; ``input_ids`` and ``targets`` (-100: no loss)
    are required, pads get id 0, target -100 and 0 elsewhere. Sequences are sorted by length first so rows
    of a micro-batch are alike and padding stays small. Right padding keeps plain causal attention exact
    for the real tokens (they never look ahead at pads). A sequence longer than ``max_tokens`` gets a
    micro-batch of its own.
    """
    if pack:
        return packed_micro_batches(sequences, max_tokens)
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
        out.append({k: torch.tensor([_padded(s[k], k, T) for s in group]) for k in group[0]})
    return out


def _padded(values: list, key: str, T: int) -> list:
    """A per-token list right-padded to T: target -100 (no loss), 0 for everything else."""
    return values + [-100 if key == "targets" else 0] * (T - len(values))


def packed_micro_batches(sequences: list[dict], max_tokens: int) -> list[dict]:
    """Sequences packed into rows of at most ``max_tokens`` tokens, one row [1, T] per micro-batch.

    Rows are filled first-fit, longest sequence first; a sequence longer than ``max_tokens`` gets a row of its own.
    Each row holds its sequences end to end, ``seq_ids`` [1, T] numbering them 0, 1, ... and its pads (id 0,
    target -100, weight 0) one id more, so that attention stays within each sequence and positions restart at 0
    (nanotorl.attention); T is one of a few lengths (:func:`row_length`), so that compiled attention kernels and
    block masks serve step after step.
    """
    rows, room = [], []
    for seq in sorted(sequences, key=lambda s: -len(s["input_ids"])):
        n = len(seq["input_ids"])
        fit = next((i for i, free in enumerate(room) if free >= n), None)
        if fit is None:
            rows.append([])
            room.append(max_tokens)
            fit = len(rows) - 1
        rows[fit].append(seq)
        room[fit] -= n
    out = []
    for row in rows:
        n = sum(len(s["input_ids"]) for s in row)
        T = row_length(n, max_tokens)
        ids = [i for i, s in enumerate(row) for _ in s["input_ids"]]
        out.append({k: torch.tensor([_padded(sum((s[k] for s in row), []), k, T)]) for k in row[0]}
                   | {"seq_ids": torch.tensor([ids + [len(row)] * (T - n)])})
    return out


def row_length(n: int, max_tokens: int) -> int:
    """The length a packed row of n tokens is padded to: the smallest of u, 2u, 4u and 8u that holds it, u being an
    eighth of ``max_tokens`` rounded up to whole blocks of FlexAttention; a multiple of u beyond (one sequence
    longer than ``max_tokens``)."""
    u = -(-max_tokens // (8 * FLEX_BLOCK)) * FLEX_BLOCK
    return next((T for T in (u, 2 * u, 4 * u, 8 * u) if n <= T), -(-n // u) * u)


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


# ------------------------------------------------------------------------------------------- one step's batch


@dataclass
class Batch:
    """This rank's share of one GRPO step, ready for the trainer."""
    micro_batches: list[dict]   # right-padded [B, T] tensors, or packed rows [1, T]: see :func:`micro_batches`
    tokens: int                 # policy tokens (weight > 0): the normalizer of token aggregation, once summed
    sequences: int              # responses kept: the normalizer of sequence aggregation, once summed


def grpo_batch(samples: list, cfg: GRPOConfig, max_tokens: int, pack: bool = False) -> Batch:
    """samples -> advantages -> sequences -> micro-batches of at most ``max_tokens`` tokens (``pack``: several
    sequences per row).

    ``samples`` (:class:`nanotorl.rollout.Sample`) come in whole groups of ``cfg.group_size`` consecutive
    responses to one prompt; the advantages are computed over whole groups, then the responses that get no loss
    (:func:`trained`) are left out.
    """
    rewards = torch.tensor([s.reward for s in samples])
    adv = group_advantages(rewards, cfg.group_size, cfg.std_normalize)
    seqs = [policy_sequence(s.completion.prompt_ids, s.completion.response_ids, s.completion.loss_mask,
                            s.completion.logprobs, float(a), cfg.aggregation)
            | {"sample": [i] * (len(s.completion.prompt_ids) + len(s.completion.response_ids))}  # its index here
            for i, (s, a, k) in enumerate(zip(samples, adv.tolist(), trained(samples, rewards, cfg))) if k]
    return Batch(micro_batches(seqs, max_tokens, pack), tokens=sum(sum(m > 0 for m in s["weight"]) for s in seqs),
                 sequences=len(seqs))


def trained(samples: list, rewards: torch.Tensor, cfg: GRPOConfig) -> list[bool]:
    """Which of ``samples`` the loss sees: all but the members of uniform groups (``skip_uniform_groups``), the
    truncated responses (``mask_truncated``) and those with a void turn (``filter_void_turns``)."""
    uniform = uniform_groups(rewards, cfg.group_size).tolist() if cfg.skip_uniform_groups else [False] * len(samples)
    return [not (u or (cfg.mask_truncated and s.truncated) or (cfg.filter_void_turns and s.void_turn))
            for s, u in zip(samples, uniform)]


def loss_normalizer(cfg: GRPOConfig, tokens: float, sequences: float, max_new_tokens: int) -> float:
    """What :func:`policy_loss` divides by, from the global counts of policy tokens and of sequences trained, and the
    token budget of a response (module docstring); at least 1."""
    by = {"token": tokens, "sequence": sequences, "constant": sequences * max_new_tokens}
    return max(by[cfg.aggregation], 1.0)


def filler_micro_batch() -> dict:
    """A two-token sequence with weight 0, so its loss and gradient are 0. Under FSDP every rank must make the
    same number of forward/backward passes: a rank that has run out of micro-batches makes these."""
    return micro_batches([policy_sequence([0], [0], [0], [0.0], 0.0)], 1)[0]


class LossStats:
    """Sums over the micro-batches of one step, for the log, kept on the device: :meth:`read` brings them to the host
    once per step (a read per micro-batch would make the host wait for each forward before launching its
    backward); :meth:`means` once summed over the ranks."""
    KEYS = ("clipped", "dual_clipped", "entropy", "gap_sum", "kl", "loss")

    def __init__(self, n_samples: int = 0):
        self.sums = None     # [len(KEYS)] float64, in the order of KEYS
        self.gap_max = None  # 0-dim: largest |trainer log-prob - generator log-prob| of a policy token
        self.n_samples = n_samples
        self.sample_gap = None  # [2, n_samples] float64: each response's largest gap, and 1 if it had a policy token
        self.sample_gaps = {}   # after :meth:`read`: {index of a response in the step's samples: its largest gap}

    def add(self, loss, stats: dict, logp, old_logp, weight, entropy, sample=None) -> None:
        """One micro-batch: its loss and :func:`policy_loss` stats; per token [N]: log-probs now and at
        sampling, weights, entropies and (``sample``, optional) the index of the response it belongs to."""
        on = weight > 0
        gap = torch.where(on, (logp.detach() - old_logp).abs(), 0.0)
        parts = {"entropy": torch.where(on, entropy.detach(), 0.0).sum(), "gap_sum": gap.sum(), "loss": loss.detach()}
        new = torch.stack([(parts[k] if k in parts else stats[k]).double() for k in self.KEYS])
        first = self.sums is None
        self.sums = new if first else self.sums + new
        self.gap_max = gap.max() if first else torch.maximum(self.gap_max, gap.max())
        if sample is not None:
            if self.sample_gap is None:
                self.sample_gap = torch.zeros(2, self.n_samples, dtype=torch.float64, device=gap.device)
            ids = torch.where(on, sample.flatten(), 0).long().expand(2, -1).contiguous()
            self.sample_gap.scatter_reduce_(1, ids, torch.stack([gap.double(), on.double()]), "amax")

    def read(self, grad_norm: torch.Tensor) -> tuple[dict, float, float]:
        """(sums by key, largest gap, ``grad_norm``) on the host, in one read-back (which also fills
        :attr:`sample_gaps`)."""
        per_sample = [] if self.sample_gap is None else [self.sample_gap.flatten()]
        values = torch.cat([self.sums, self.gap_max.double()[None], grad_norm.double().reshape(1)] + per_sample)
        values = values.tolist()
        head, tail = values[:len(self.KEYS) + 2], values[len(self.KEYS) + 2:]
        gaps, seen = tail[:len(tail) // 2], tail[len(tail) // 2:]
        self.sample_gaps = {i: g for i, (g, s) in enumerate(zip(gaps, seen)) if s}
        return dict(zip(self.KEYS, head)), head[-2], head[-1]

    @staticmethod
    def means(sums: dict, gap_max: float, grad_norm: float) -> dict:
        """The step's record from ``sums`` (with ``tokens`` and ``sequences``, the policy tokens and the responses
        trained) added up over the ranks."""
        n = max(sums["tokens"], 1)
        return {"entropy": sums["entropy"] / n, "clip_fraction": sums["clipped"] / n,
                "dual_clip_fraction": sums["dual_clipped"] / n, "kl": sums["kl"] / n, "loss": sums["loss"],
                "grad_norm": grad_norm, "logprob_gap_mean": sums["gap_sum"] / n, "logprob_gap_max": gap_max,
                "trained_tokens": int(sums["tokens"]), "trained_sequences": int(sums["sequences"])}
