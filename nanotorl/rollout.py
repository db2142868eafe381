"""Rollouts: problems -> groups of tool-integrated responses -> rewards, and the statistics train and eval share.

Each response's sampling seed is a function of (run seed, the problem's index in the run, the sample's index),
so a rollout is the same whichever rank generates it, in whatever batch, before or after a resume.
"""
from dataclasses import dataclass

from nanotorl.data import Problem
from nanotorl.generate import Completion, Generator, Request, SamplingParams
from nanotorl.reward import policy_segments, score


@dataclass
class Sample:
    problem: Problem
    completion: Completion
    answer: str | None   # the last \boxed{} of the policy's own text
    correct: bool
    reward: float


@dataclass(frozen=True)
class Draw:
    """One response to generate: sample ``sample`` of the problem at ``index`` in the run (both feed its seed)."""
    problem: Problem
    index: int
    sample: int
    sampling: SamplingParams


def sample_seed(seed: int, problem_index: int, sample_index: int) -> int:
    return (seed * 1_000_003 + problem_index) * 1_009 + sample_index


def groups(problems: list[Problem], group_size: int, sampling: SamplingParams, first_index: int = 0) -> list[Draw]:
    """``group_size`` draws of every problem, consecutive; ``first_index`` is the index of ``problems[0]`` in the
    whole run."""
    return [Draw(p, first_index + i, j, sampling) for i, p in enumerate(problems) for j in range(group_size)]


def requests(tok, draws: list[Draw], *, max_new_tokens: int, max_tool_calls: int, seed: int) -> list[Request]:
    """The generator's request for every draw, in order: its prompt ids and its own seed."""
    prompts = {}  # each problem's prompt, encoded once and shared by its draws
    for d in draws:
        if d.problem.problem not in prompts:
            prompts[d.problem.problem] = tok.prompt_ids(d.problem.problem)
    return [Request(prompts[d.problem.problem], max_new_tokens=max_new_tokens, sampling=d.sampling,
                    seed=sample_seed(seed, d.index, d.sample), max_tool_calls=max_tool_calls) for d in draws]


def rollout(generator: Generator, draws: list[Draw], *, max_new_tokens: int, max_tool_calls: int, seed: int,
            code_penalty: float = 0.0, progress=None) -> list[Sample]:
    """Generate every draw in one batch and score it; the samples come back in the order of ``draws``."""
    tok = generator.tokenizer
    batch = requests(tok, draws, max_new_tokens=max_new_tokens, max_tool_calls=max_tool_calls, seed=seed)
    completions = generator.generate(batch, progress=progress)
    return [score_completion(d.problem, c, tok.decode, code_penalty) for d, c in zip(draws, completions)]


def score_completion(problem: Problem, completion: Completion, decode, code_penalty: float = 0.0) -> Sample:
    """One response scored by :func:`nanotorl.reward.score` on the policy's own tokens (never tool output); a
    tool call that did not end 'ok' counts as failed code."""
    failed = any(c.status != "ok" for c in completion.tool_calls)
    segments = policy_segments(completion.response_ids, completion.loss_mask, decode)
    return Sample(problem, completion, *score(segments, problem.answer, failed_code=failed, code_penalty=code_penalty))


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
    """Means from :func:`rollout_stats` sums: reward and accuracy, then :func:`tool_means`."""
    n = max(sums["n"], 1)
    return {"reward": sums["reward"] / n, "accuracy": sums["correct"] / n} | tool_means(sums)


def tool_means(sums: dict) -> dict:
    """Tool use and length from the sums ``n``, ``with_tool``, ``calls``, ``calls_ok`` and ``response_tokens``:
    the fraction of responses that call the tool, the fraction of calls without error, calls per response and
    mean response length. The fraction of calls without error is None (JSON null) when there was no call:
    undefined rather than 0, and still valid JSON in metrics.jsonl and eval's results.json."""
    n = max(sums["n"], 1)
    return {"tool_fraction": sums["with_tool"] / n,
            "calls_ok_fraction": sums["calls_ok"] / sums["calls"] if sums["calls"] else None,
            "calls_per_response": sums["calls"] / n, "response_length": sums["response_tokens"] / n}
