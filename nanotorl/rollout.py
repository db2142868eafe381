"""Rollouts: problems -> groups of tool-integrated responses -> rewards, and the statistics train and eval share.

Each response's sampling seed is a function of (run seed, the problem's index in the run, the sample's index),
so a rollout is the same whichever rank generates it, in whatever batch, before or after a resume.
"""
from dataclasses import dataclass

from nanotorl.data import Problem
from nanotorl.generate import Completion, Generator, Request, SamplingParams
from nanotorl.reward import final_answer, is_equivalent, policy_segments


@dataclass
class Sample:
    problem: Problem
    completion: Completion
    answer: str | None   # the last \boxed{} of the policy's own text
    correct: bool
    reward: float

    @property
    def failed_code(self) -> bool:
        return any(c.status != "ok" for c in self.completion.tool_calls)


def sample_seed(seed: int, problem_index: int, sample_index: int) -> int:
    return (seed * 1_000_003 + problem_index) * 1_009 + sample_index


def rollout(generator: Generator, problems: list[Problem], *, group_size: int, sampling: SamplingParams,
            max_new_tokens: int, max_tool_calls: int, seed: int, first_index: int = 0,
            code_penalty: float = 0.0, progress=None) -> list[Sample]:
    """Generate ``group_size`` responses per problem (consecutive in the result) and score them.

    ``first_index`` is the index of ``problems[0]`` in the whole run (it feeds the sampling seeds).
    """
    tok = generator.tokenizer
    prompts = [tok.prompt_ids(p.problem) for p in problems]  # encoded once per problem, shared by its group
    requests = [Request(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                        seed=sample_seed(seed, first_index + i, j), max_tool_calls=max_tool_calls)
                for i, prompt in enumerate(prompts) for j in range(group_size)]
    completions = generator.generate(requests, progress=progress)
    return [score_completion(problems[k // group_size], c, tok.decode, code_penalty)
            for k, c in enumerate(completions)]


def score_completion(problem: Problem, completion: Completion, decode, code_penalty: float = 0.0) -> Sample:
    """The ToRL reward of one response: the last \\boxed{} of the policy's own tokens (never tool output)
    against the ground truth, +1 or -1, minus ``code_penalty`` if a tool call failed."""
    answer = final_answer(policy_segments(completion.response_ids, completion.loss_mask, decode))
    correct = answer is not None and is_equivalent(answer, problem.answer)
    s = Sample(problem, completion, answer, correct, 1.0 if correct else -1.0)
    if s.failed_code:
        s.reward -= code_penalty
    return s


def rollout_stats(samples: list[Sample]) -> dict:
    """Sums over ``samples`` (so ranks can add theirs up); :func:`finish_stats` turns them into means."""
    calls = [c for s in samples for c in s.completion.tool_calls]
    return {"n": len(samples), "reward": sum(s.reward for s in samples),
            "correct": sum(s.correct for s in samples),
            "with_tool": sum(bool(s.completion.tool_calls) for s in samples),
            "calls": len(calls), "calls_ok": sum(c.status == "ok" for c in calls),
            "response_tokens": sum(len(s.completion.response_ids) for s in samples),
            "sampled_tokens": sum(sum(s.completion.loss_mask) for s in samples)}


def finish_stats(sums: dict) -> dict:
    """Means from :func:`rollout_stats` sums: reward, accuracy, tool-call fraction, calls without error,
    calls per response and mean response length."""
    n = max(sums["n"], 1)
    return {"reward": sums["reward"] / n, "accuracy": sums["correct"] / n,
            "tool_fraction": sums["with_tool"] / n,
            "calls_ok_fraction": sums["calls_ok"] / sums["calls"] if sums["calls"] else float("nan"),
            "calls_per_response": sums["calls"] / n, "response_length": sums["response_tokens"] / n}
