"""The generator reads back the lines its slots ended together: one read for the step's flags and one for every
line ended in that step, however many slots ended one (not one read per slot)."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Generator, Request, SamplingParams
from nanotorl.tokenizer import Tokenizer
from test_generate import FakeSandbox, Forced, scripted


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.Tensor.tolist
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


def test_lines_of_every_slot_read_back_in_one_go(tok, monkeypatch):
    before, after = "Let me compute.\nSo:\n```python\nprint(6 * 7)\n```\n", "The answer is \\boxed{42}"
    prompt, script, obs, n1, n2 = scripted(tok, before, after, "42")
    reads, advance = [], Generator._advance

    def counted(self, slots, *args):
        with CountReads() as count:
            finished = advance(self, slots, *args)
        reads.append((len(slots), count.n))
        return finished

    monkeypatch.setattr(Generator, "_advance", counted)
    box, slots = FakeSandbox(), 3
    outs = Generator(Forced(script, tok.vocab_size), tok, box, slots=slots, max_len=128).generate(
        [Request(prompt, max_new_tokens=100, sampling=SamplingParams(temperature=0.0)) for _ in range(slots)])
    assert box.calls == ["print(6 * 7)\n"] * slots
    for out in outs:  # each as it is alone (test_generate's test of the tool call)
        assert out.response_ids == script[len(prompt):] and out.loss_mask == [1] * n1 + [0] * len(obs) + [1] * n2
    assert max(n for _, n in reads) == 2                    # the flags, then every ended line at once
    assert any(r == slots and n == 2 for r, n in reads)     # steps where all three slots ended a line
