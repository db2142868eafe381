"""rollout: the requests it makes (prompt, seed, sampling, budgets) for groups and single draws, and the samples
it returns, in draw order, scored on the policy's own tokens (never tool output) with the code penalty; the
statistics of tool health and turns, and the void-turn and truncation flags, against hand counts."""
import json
from concurrent.futures import Future

import pytest

from nanotorl.data import Problem
from nanotorl.demo import save_demo_tokenizer
from nanotorl.generate import Completion, Generator, Request, SamplingParams, ToolCall
from nanotorl.grpo import GRPOConfig, grpo_batch
from nanotorl.rollout import (Draw, finish_stats, groups, rollout, rollout_stats, sample_seed, score_completion,
                              tool_failures)
from nanotorl.tokenizer import Tokenizer
from nanotorl.tool import finished_call
from nanotorl.sandbox.result import Result

A = Problem("a", "What is 2 + 3?", "5")
B = Problem("b", "What is 4 * 4?", "16")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_demo_tokenizer(path)
    return Tokenizer(path)


class Scripted:
    """A generator stand-in: records the requests and answers each with the next (parts, tool calls[, finish
    reason]) of a script; parts are (text, mask) pieces, mask 0 for tool output."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.requests = tokenizer, list(script), []

    def generate(self, requests, progress=None):
        self.requests += requests
        out = []
        for r, (parts, calls, *finish) in zip(requests, self.script):
            ids = [self.tokenizer.encode(text) for text, _ in parts]
            mask = [m for (_, m), piece in zip(parts, ids) for _ in piece]
            out.append(Completion(r.prompt_ids, sum(ids, []), mask, [0.0] * len(mask), calls, (finish or ["eos"])[0]))
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
                     "calls_per_response": 0.0, "response_length": len(tok.encode("\\boxed{5}")),
                     "tool_infra_failures": 0, "tool_code_failures": 0, "multi_call_fraction": 0.0,
                     "calls_fixed_fraction": None, "truncated_fraction": 0.0, "void_turn_fraction": 0.0}
    json.dumps(stats, allow_nan=False)


def call(code, result: Result):
    """The ToolCall the generator makes of ``result`` (nanotorl.tool.finished_call)."""
    future = Future()
    future.set_result(result)
    return finished_call(future, code)


OK = Result("ok", "1\n", exit_code=0)
NAME = Result("error", exit_code=1, error_line="NameError: name 'x' is not defined")
SYNTAX = Result("error", exit_code=1, error_line="SyntaxError: invalid syntax")
TIMEOUT = Result("timeout")
DIED = Result("killed", stderr="sandbox: the server died before this run finished\n", infra_error=True)


def test_tool_health_and_multi_turn_stats_against_hand_count(tok):
    """Per response: its calls; by hand: 8 calls, 3 ok, 2 infrastructure failures (not code failures), 3 code
    failures of which 2 were retried and 1 fixed by the next call; 3 responses with 2 or more calls."""
    per_response = [[call("x", NAME), call("print(1)", OK)],          # fixed by the next call
                    [call("loop", TIMEOUT), call("(", SYNTAX)],       # retried, not fixed; the SyntaxError not retried
                    [call("print(1)", DIED)],
                    [call("print(1)", OK)],
                    [],
                    [call("print(1)", DIED), call("print(1)", OK)]]  # an infrastructure failure is not the code's
    script = [([("\\boxed{1}", 1)], calls) for calls in per_response]
    samples = rollout(Scripted(tok, script), groups([A], 6, SamplingParams()), max_new_tokens=9, max_tool_calls=3,
                      seed=0)
    stats = finish_stats(rollout_stats(samples), tool_failures(samples))
    assert {k: v for k, v in stats.items() if k.startswith(("tool_", "calls_", "multi"))} == {
        "tool_fraction": 5 / 6, "calls_ok_fraction": 3 / 8, "calls_per_response": 8 / 6,
        "tool_infra_failures": 2, "tool_code_failures": 3,
        "tool_errors/SandboxError": 2, "tool_errors/NameError": 1, "tool_errors/SyntaxError": 1,
        "tool_errors/timeout": 1, "multi_call_fraction": 3 / 6, "calls_fixed_fraction": 1 / 2}
    assert list(stats).index("tool_errors/SandboxError") < list(stats).index("tool_errors/NameError")  # most first
    assert tool_failures(samples)["infra/SandboxError: the server died before this run finished"] == 2


BLOCK = "```python\nprint(1)\n```\n"
OBSERVATION = ("```output\n1\n```\n", 0)

# (parts, number of calls, finish reason) -> (void turn, truncated): the rule of nanotorl/rollout.py's docstring
TURNS = {
    "answer, no call": (([("so \\boxed{5}", 1)], 0, "eos"), (False, False)),
    "nothing, no call": (([("I think", 1)], 0, "eos"), (True, False)),
    "cut off, no call": (([("I think", 1)], 0, "length"), (True, True)),
    "cut off after an answer": (([("\\boxed{5} and", 1)], 0, "length"), (False, False)),
    "call, then an answer": (([(BLOCK, 1), OBSERVATION, ("so \\boxed{5}", 1)], 1, "eos"), (False, False)),
    "call, then nothing": (([(BLOCK, 1), OBSERVATION, ("hmm", 1)], 1, "eos"), (True, False)),
    "call, then a box left open": (([(BLOCK, 1), OBSERVATION, ("\\boxed{5", 1)], 1, "length"), (True, True)),
    "call, then a block past the budget": (([(BLOCK, 1), OBSERVATION, (BLOCK + "done", 1)], 1, "eos"), (False, False)),
    "call, then an unclosed block": (([(BLOCK, 1), OBSERVATION, ("```python\nprint(", 1)], 1, "length"), (True, True)),
    "answer in a turn before the last": (([("\\boxed{5}\n" + BLOCK, 1), OBSERVATION, ("ok", 1)], 1, "eos"),
                                         (True, False)),
    "cut inside the observation": (([(BLOCK, 1), ("```output\n1", 0)], 1, "length"), (False, True)),
    "three calls, then an answer": (([(BLOCK, 1), OBSERVATION] * 3 + [("\\boxed{5}", 1)], 3, "eos"), (False, False)),
    "three calls, then nothing": (([(BLOCK, 1), OBSERVATION] * 3 + [("hmm", 1)], 3, "eos"), (True, False)),
}


@pytest.mark.parametrize("case", TURNS)
def test_void_turns_and_truncated_responses_by_the_documented_rule(tok, case):
    (parts, calls, finish), expected = TURNS[case]
    sample = rollout(Scripted(tok, [(parts, [call("print(1)", OK)] * calls, finish)]), groups([A], 1, SamplingParams()),
                     max_new_tokens=99, max_tool_calls=3, seed=0)[0]
    assert (sample.void_turn, sample.truncated) == expected


# --------------------------------------------------------------------------- C = 3, end to end


def block(k: int) -> str:
    return f"```python\nprint({k} * 7)\n```\n"


def output(k: int) -> str:
    return f"```output\n{k * 7}\n```\n"


# name -> (policy and tool text pieces, mask 1 for the policy's, 0 for an observation; token budget or None; what
# the sandbox must run, the void-turn flag, the truncated flag). The budget ends that many tokens (<= 0) before the
# script's end; None: the script ends with the end of text, within the budget.
THREE_CALLS = {
    "three calls, then an answer": ([(block(1), 1), (output(1), 0), (block(2), 1), (output(2), 0), (block(3), 1),
                                     (output(3), 0), ("so \\boxed{21}", 1)], None, [1, 2, 3], False, False),
    "a fourth block, past the budget": ([(block(1), 1), (output(1), 0), (block(2), 1), (output(2), 0),
                                         (block(3), 1), (output(3), 0), (block(4) + "done", 1)], None, [1, 2, 3],
                                        False, False),
    "two calls, then nothing": ([(block(1), 1), (output(1), 0), (block(2), 1), (output(2), 0), ("hmm", 1)], None,
                                [1, 2], True, False),
    "one call, then cut off": ([(block(5), 1), (output(5), 0), ("I think that the answer is", 1)], -3, [5], True,
                               True),
    "cut inside the third observation": ([(block(1), 1), (output(1), 0), (block(2), 1), (output(2), 0),
                                          (block(3), 1), (output(3), 0)], -3, [1, 2, 3], False, True),
    "no call, an answer": ([("\\boxed{0}", 1)], None, [], False, False),
    "no call, nothing": ([("no idea", 1)], None, [], True, False),
    "an unclosed block, cut off": ([("```python\nprint(1 * 7)\n", 1)], 0, [], True, True),
}


class Recording:
    """A sandbox pool that records the code it is given."""

    def __init__(self, pool):
        self.pool, self.codes = pool, []

    def submit(self, code):
        self.codes.append(code)
        return self.pool.submit(code)


def test_three_tool_calls_end_to_end(tok):
    """The real generator and sandbox at --max-tool-calls 3, a forced policy per trajectory: every call within the
    budget runs (and none past it), observations and masks are where the script puts them, the turn flags follow
    nanotorl/rollout.py's rule, and --filter-void-turns / --mask-truncated drop exactly the flagged trajectories."""
    from test_generate import Forced
    from nanotorl.sandbox import SandboxPool
    prompt = tok.prompt_ids(A.problem)
    samples = []
    with SandboxPool(workers=1, preload=()) as pool:
        for name, (parts, cut, runs, void, truncated) in THREE_CALLS.items():
            pieces = [(tok.encode(text), m) for text, m in parts]
            script = prompt + [t for ids, _ in pieces for t in ids] + ([tok.eos_id] if cut is None else [])
            mask = [m for ids, m in pieces for _ in ids] + ([1] if cut is None else [])
            budget = len(script) - len(prompt) + (cut or 0)
            box = Recording(pool)
            gen = Generator(Forced(script, tok.vocab_size), tok, box, max_len=len(script) + 8)
            [out] = gen.generate([Request(prompt, max_new_tokens=budget, max_tool_calls=3,
                                          sampling=SamplingParams(temperature=0.0))])
            assert box.codes == [f"print({k} * 7)\n" for k in runs], name
            assert [c.observation for c in out.tool_calls] == [str(k * 7) for k in runs], name
            assert out.response_ids == script[len(prompt):len(prompt) + budget], name
            assert out.loss_mask == mask[:budget], name
            assert out.finish_reason == ("eos" if cut is None else "length"), name
            s = score_completion(A, out, tok.decode)
            assert (s.void_turn, s.truncated) == (void, truncated), name
            samples.append(s)
    names = list(THREE_CALLS)
    for options, dropped in (({}, set()), ({"filter_void_turns": True}, {n for n in names if THREE_CALLS[n][3]}),
                             ({"mask_truncated": True}, {n for n in names if THREE_CALLS[n][4]}),
                             ({"filter_void_turns": True, "mask_truncated": True},
                              {n for n in names if THREE_CALLS[n][3] or THREE_CALLS[n][4]})):
        batch = grpo_batch(samples, GRPOConfig(group_size=len(samples), **options), max_tokens=10**6)
        [mb] = batch.micro_batches
        T = mb["input_ids"].shape[1]
        trained = {tuple(row) for row in mb["input_ids"].tolist()}
        expected = {tuple(prompt + s.completion.response_ids + [0] * (T - len(prompt) - len(s.completion.response_ids)))
                    for n, s in zip(names, samples) if n not in dropped}
        assert trained == expected and batch.sequences == len(names) - len(dropped), options
    stats = finish_stats(rollout_stats(samples))
    assert stats["calls_per_response"] == 12 / 8 and stats["multi_call_fraction"] == 4 / 8
    assert stats["void_turn_fraction"] == 4 / 8 and stats["truncated_fraction"] == 3 / 8
