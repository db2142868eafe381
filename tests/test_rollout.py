"""rollout: the requests it makes (prompt, seed, sampling, budgets) for groups and single draws, and the samples
it returns, in draw order, scored on the policy's own tokens (never tool output) with the code penalty."""
import json

import pytest

from nanotorl.data import Problem
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Completion, SamplingParams, ToolCall
from nanotorl.rollout import Draw, finish_stats, groups, rollout, rollout_stats, sample_seed
from nanotorl.tokenizer import Tokenizer

A = Problem("a", "What is 2 + 3?", "5")
B = Problem("b", "What is 4 * 4?", "16")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


class Scripted:
    """A generator stand-in: records the requests and answers each with the next (parts, tool calls) of a script;
    parts are (text, mask) pieces, mask 0 for tool output."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.requests = tokenizer, list(script), []

    def generate(self, requests, progress=None):
        self.requests += requests
        out = []
        for r, (parts, calls) in zip(requests, self.script):
            ids = [self.tokenizer.encode(text) for text, _ in parts]
            mask = [m for (_, m), piece in zip(parts, ids) for _ in piece]
            out.append(Completion(r.prompt_ids, sum(ids, []), mask, [0.0] * len(mask), calls, "eos"))
        return out


def test_groups_are_consecutive_with_run_indices():
    hot = SamplingParams(temperature=1.0)
    assert groups([A, B], 2, hot, first_index=10) == [Draw(A, 10, 0, hot), Draw(A, 10, 1, hot),
                                                      Draw(B, 11, 0, hot), Draw(B, 11, 1, hot)]


def test_requests_carry_each_draws_prompt_seed_sampling_and_budgets(tok):
    hot, greedy = SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.0)
    draws = [Draw(A, 10, 0, hot), Draw(B, 3, 5, greedy), Draw(A, 10, 1, hot)]
    gen = Scripted(tok, [([("\\boxed{5}", 1)], [])] * 3)
    rollout(gen, draws, max_new_tokens=9, max_tool_calls=2, seed=7)
    got = [(r.prompt_ids, r.seed, r.sampling, r.max_new_tokens, r.max_tool_calls) for r in gen.requests]
    assert got == [(tok.prompt_ids(A.problem), sample_seed(7, 10, 0), hot, 9, 2),
                   (tok.prompt_ids(B.problem), sample_seed(7, 3, 5), greedy, 9, 2),
                   (tok.prompt_ids(A.problem), sample_seed(7, 10, 1), hot, 9, 2)]
    assert len({r.seed for r in gen.requests}) == 3


def test_samples_in_draw_order_scored_on_policy_tokens_with_code_penalty(tok):
    failed, ok = ToolCall("1/0", "error", "ZeroDivisionError", 0.0), ToolCall("print(16)", "ok", "16", 0.0)
    script = [([("\\boxed{5}", 1)], []),                                             # right, no tool
              ([("```python\n1/0\n```\n", 1), ("```output\n\\boxed{5}\n```\n", 0)], [failed]),  # box only in output
              ([("```python\nprint(16)\n```\n", 1), ("```output\n16\n```\n", 0), ("\\boxed{16}", 1)], [ok])]
    gen = Scripted(tok, script)
    samples = rollout(gen, [Draw(A, 0, 0, SamplingParams()), Draw(A, 0, 1, SamplingParams()),
                            Draw(B, 1, 0, SamplingParams())], max_new_tokens=50, max_tool_calls=1, seed=0,
                      code_penalty=0.5)
    assert [s.problem.id for s in samples] == ["a", "a", "b"]
    assert [(s.answer, s.correct, s.reward) for s in samples] == [("5", True, 1.0), (None, False, -1.5),
                                                                 ("16", True, 1.0)]


def test_stats_without_tool_calls_are_valid_json(tok):
    """No call: the fraction of calls without error is undefined, logged as null (never NaN, which is not JSON)."""
    samples = rollout(Scripted(tok, [([("\\boxed{5}", 1)], [])] * 2), groups([A], 2, SamplingParams()),
                      max_new_tokens=9, max_tool_calls=1, seed=0)
    stats = finish_stats(rollout_stats(samples))
    assert stats == {"reward": 1.0, "accuracy": 1.0, "tool_fraction": 0.0, "calls_ok_fraction": None,
                     "calls_per_response": 0.0, "response_length": len(tok.encode("\\boxed{5}"))}
    json.dumps(stats, allow_nan=False)
