"""A train micro-batch never makes the host wait for the device, seen on CPU.

``train.train_micro_batch`` (forward, fused log-prob, GRPO loss, backward, the step's statistics) runs under
``host_sync.no_host_sync`` on the code a GPU runs: the Triton log-prob kernels (interpreted), the CUDA attention
rule (``nanotorl.attention._cuda`` answering yes), right-padded and packed rows, the dual clip on. The statistics
it kept on the device, read back once, equal those computed from the plain PyTorch log-prob reference.
"""
import pytest
import torch

import train
from conftest import interpreted
from host_sync import no_host_sync
from nanotorl import attention
from nanotorl.config import TrainConfig
from nanotorl.grpo import GRPOConfig, LossStats, micro_batches, policy_loss, policy_sequence
from nanotorl.kernels.logprob_ref import logprob_ref
from nanotorl.model import Qwen2, Qwen2Config


def batch(pack: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, (P, n) in enumerate([(3, 5), (4, 2), (2, 6)]):
        ids = torch.randint(0, 61, (P + n,), generator=g).tolist()
        seqs.append(policy_sequence(ids[:P], ids[P:], [1] * (n - 1) + [0], (-torch.rand(n, generator=g)).tolist(),
                                    advantage=(-1.0) ** i * (i + 1) / 2))
    return micro_batches(seqs, 16, pack)


def model():
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return Qwen2(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(1))


def reference_sums(net, mbs, cfg: TrainConfig, normalizer: float) -> dict:
    """loss, entropy and log-prob gap summed over the micro-batches, from logprob_ref, read on the host."""
    sums = {"loss": 0.0, "entropy": 0.0, "gap_sum": 0.0}
    for mb in mbs:
        h = net(mb["input_ids"], seq_ids=mb.get("seq_ids")).flatten(0, 1)
        logp, entropy = logprob_ref(h, net.head_weight, mb["targets"].flatten(), return_entropy=True)
        weight, old = mb["weight"].flatten(), mb["old_logp"].flatten()
        loss, _ = policy_loss(logp, old, mb["advantage"].flatten(), weight, cfg.grpo, normalizer)
        on = (weight > 0).tolist()
        sums["loss"] += loss.item()
        sums["entropy"] += sum(e for e, k in zip(entropy.tolist(), on) if k)
        sums["gap_sum"] += sum(abs(a - b) for a, b, k in zip(logp.tolist(), old.tolist(), on) if k)
    return sums


@pytest.mark.parametrize("pack", [False, True], ids=["padded", "packed"])
def test_train_micro_batch_never_waits_for_the_device(pack, monkeypatch, triton_interpreter):
    interpreted("nanotorl.kernels.logprob")
    monkeypatch.setattr(attention, "_cuda", lambda t: True)
    cfg = TrainConfig(grpo=GRPOConfig(dual_clip=3.0))
    net, mbs, stats = model(), batch(pack), LossStats()
    for mb in mbs:
        with no_host_sync():
            train.train_micro_batch(net, mb, cfg, 7.0, 1, stats)
    sums, gap_max, grad_norm = stats.read(torch.tensor(2.5))
    assert grad_norm == 2.5 and gap_max > 0
    with torch.no_grad():
        want = reference_sums(net, mbs, cfg, 7.0)
    for key, value in want.items():
        assert sums[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
