"""Rollouts: problems -> groups of tool-integrated responses -> rewards, and the statistics train and eval share.

Each response's sampling seed is a function of (run seed, the problem's index in the run, the sample's index),
so a rollout is the same whichever rank generates it, in whatever batch, before or after a resume.

Turns. A turn is the policy's text between observations: the first runs from the start of the response to the
tool call that ends it, the next from the end of that call's observation to the next call, and so on; the
final turn is the policy's text after the last observation (the whole response when it made no call). A response
with c calls therefore has c + 1 turns, or c when it was cut by the token budget inside its last observation (no
policy token follows it: there is no final turn). Every turn but the final one produced a complete code block,
since a closed ```python block is what makes a call. The final turn is *void* (SimpleTIR, arXiv 2509.02479) when
it holds neither a final answer (a closed ``\boxed{...}``) nor a complete ```python block (one that
:func:`nanotorl.fences.tool_call` finds, i.e. that would make a call): the model ended, or was cut off, with
nothing to show for its last turn. A block written after the call budget is spent is not run and
stays in the response as policy text (with trigger 'fence', and in ToRL's own mode ``--compat torl``; else with
trigger 'output' the model's ```output then ends the response): it still counts as a complete code block, as in
SimpleTIR, so such a final turn is not void. ``Sample.void_turn`` marks a response with a void turn and ``Sample.truncated`` one cut by the
token budget without a final answer; ``--filter-void-turns`` and ``--mask-truncated`` give them zero loss weight
(:func:`nanotorl.grpo.trained`).
"""
from collections import Counter
from dataclasses import dataclass

from nanotorl.data import Problem
from nanotorl.fences import tool_call
from nanotorl.generate import Completion, Generator, Request, SamplingParams
from nanotorl.reward import last_boxed, policy_segments, score
from nanotorl.tool import ToolCall


@dataclass
class Sample:
    problem: Problem
    completion: Completion
    answer: str | None   # the last \boxed{} of the policy's own text
    correct: bool
    reward: float
    truncated: bool = False   # cut by the token budget with no final answer
    void_turn: bool = False   # its final turn holds neither a final answer nor a complete code block (docstring)
    logprob_gap: float | None = None  # largest |trainer - generator log-prob| of its tokens, once trained


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
    """One response scored by :func:`nanotorl.reward.score` on the policy's own tokens (never tool output), a
    tool call that did not end 'ok' counting as failed code; with its turn flags (module docstring)."""
    failed = any(c.status != "ok" for c in completion.tool_calls)
    segments = policy_segments(completion.response_ids, completion.loss_mask, decode)
    answer, correct, reward = score(segments, problem.answer, failed_code=failed, code_penalty=code_penalty)
    truncated = completion.finish_reason == "length" and answer is None
    return Sample(problem, completion, answer, correct, reward, truncated, void_turn(segments, completion.tool_calls))


def void_turn(turns: list[str], calls: list[ToolCall]) -> bool:
    """Is the final turn void? ``turns``: the policy text of each turn (``policy_segments``), ``calls``: the
    response's tool calls (module docstring)."""
    if len(turns) <= len(calls):  # cut inside its last observation: no final turn
        return False
    return last_boxed(turns[-1]) is None and tool_call(turns[-1], "fence") is None


def rollout_stats(samples: list[Sample]) -> dict:
    """Sums over ``samples`` (so ranks can add theirs up); :func:`finish_stats` turns them into means. A failed
    call is "retried" when the same response calls again, and "fixed" when that next call runs without error."""
    per_response = [s.completion.tool_calls for s in samples]
    calls = [c for cs in per_response for c in cs]
    code_failed = [(c, after) for cs in per_response for c, after in zip(cs, cs[1:] + [None])
                   if c.status != "ok" and not c.infra_error]
    return {"n": len(samples), "reward": sum(s.reward for s in samples),
            "correct": sum(s.correct for s in samples),
            "with_tool": sum(bool(cs) for cs in per_response), "multi_call": sum(len(cs) >= 2 for cs in per_response),
            "calls": len(calls), "calls_ok": sum(c.status == "ok" for c in calls),
            "calls_infra_failed": sum(c.infra_error for c in calls), "calls_code_failed": len(code_failed),
            "retried": sum(after is not None for _, after in code_failed),
            "fixed": sum(after is not None and after.status == "ok" for _, after in code_failed),
            "truncated": sum(s.truncated for s in samples), "void_turn": sum(s.void_turn for s in samples),
            "response_tokens": sum(len(s.completion.response_ids) for s in samples),
            "sampled_tokens": sum(sum(s.completion.loss_mask) for s in samples)}


def tool_failures(samples: list[Sample]) -> Counter:
    """What went wrong in the failed calls of ``samples``: "kind/<error kind>" (e.g. "kind/NameError") and, for the
    sandbox's own failures, "infra/<what failed>" (the observation), each with its number of calls."""
    counts = Counter()
    for call in (c for s in samples for c in s.completion.tool_calls if c.error_kind):
        counts[f"kind/{call.error_kind}"] += 1
        if call.infra_error:
            counts[f"infra/{call.observation}"] += 1
    return counts


def most_common(counts: dict, top: int) -> list[tuple[str, float]]:
    """The ``top`` largest counts, largest first, ties by name (the same order on every rank)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def finish_stats(sums: dict, failures: Counter | None = None, top: int = 5) -> dict:
    """Means from :func:`rollout_stats` sums: reward and accuracy, then :func:`tool_means`; the sandbox's health
    (calls that failed in the sandbox itself, calls whose code failed, and the ``top`` most common error kinds of
    ``failures`` from :func:`tool_failures`, as counts); and the turns: the fraction of responses with 2 or more
    calls, of the failed calls retried that the next call fixed (None when none was retried), of responses
    truncated without an answer and of those with a void turn."""
    n = max(sums["n"], 1)
    kinds = {key.removeprefix("kind/"): v for key, v in (failures or {}).items() if key.startswith("kind/")}
    return ({"reward": sums["reward"] / n, "accuracy": sums["correct"] / n} | tool_means(sums)
            | {"tool_infra_failures": int(sums["calls_infra_failed"]),
               "tool_code_failures": int(sums["calls_code_failed"])}
            | {f"tool_errors/{kind}": int(count) for kind, count in most_common(kinds, top)}
            | {"multi_call_fraction": sums["multi_call"] / n,
               "calls_fixed_fraction": sums["fixed"] / sums["retried"] if sums["retried"] else None,
               "truncated_fraction": sums["truncated"] / n, "void_turn_fraction": sums["void_turn"] / n})


def tool_means(sums: dict) -> dict:
    """Tool use and length from the sums ``n``, ``with_tool``, ``calls``, ``calls_ok`` and ``response_tokens``:
    the fraction of responses that call the tool, the fraction of calls without error, calls per response and
    mean response length. The fraction of calls without error is None (JSON null) when there was no call:
    undefined rather than 0, and still valid JSON in metrics.jsonl and eval's results.json."""
    n = max(sums["n"], 1)
    return {"tool_fraction": sums["with_tool"] / n,
            "calls_ok_fraction": sums["calls_ok"] / sums["calls"] if sums["calls"] else None,
            "calls_per_response": sums["calls"] / n, "response_length": sums["response_tokens"] / n}
