"""What a run keeps of its responses, to read them later (``python -m nanotorl.view``): one JSON record per response,
the same in training's ``samples.jsonl`` and in eval.py's.

A record (:func:`sample_record`) holds the problem and its rendered ``prompt``; ``answer`` (the gold answer; eval's
name for it), ``extracted`` (the last ``\\boxed{}`` of the policy's own text, None if none), ``correct`` and
``reward``; ``response``, the whole response as text, and ``masked``, the [start, end) character offsets of its
tool-output stretches in it (the tokens the loss never sees, mask 0); ``tool_calls`` (each call's code, status,
observation, error kind and whether the sandbox itself failed), ``finish_reason``, the ``truncated`` and
``void_turn`` flags (:mod:`nanotorl.rollout`), ``response_tokens`` (tool output included), ``policy_tokens`` and
``logprob_gap`` (the largest |trainer - generator log-prob| of its policy tokens; None where it was not trained).
Training adds ``step``, ``mode`` ("train", or "greedy" for held-out validation), ``index`` (the sample in its
group), ``advantage`` and ``trained`` (False when the loss gave it zero weight, :func:`nanotorl.grpo.trained`);
eval.py adds ``dataset``, ``mode`` ("greedy" or "sampled") and ``index``.

Training keeps a bounded sample (:func:`logged_indices`): at every ``--log-samples-every`` step, up to
``--log-samples`` responses, from as many groups as that takes, three of each group: its best, its worst and one
drawn at random (two when best and worst are one response); at every validation, the greedy responses to the first
``--log-eval-samples`` held-out problems. Each step's records are appended in one write, and a resumed run first
drops what a crashed one logged after its last checkpoint (:func:`drop_after`), as metrics.jsonl does.
"""
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

from nanotorl import dist
from nanotorl.faults import kept_log_lines

PER_GROUP = 3  # responses kept of each logged group


def sample_record(sample, tok, **extra) -> dict:
    """One scored response (:class:`nanotorl.rollout.Sample`) as a JSON-able dict (module docstring); ``tok``
    decodes it and renders its prompt; ``extra`` is added as is."""
    problem, completion = sample.problem, sample.completion
    runs = token_runs(completion.response_ids, completion.loss_mask)
    texts = [tok.decode(ids) for ids, _ in runs]
    masked, at = [], 0
    for text, (_, policy) in zip(texts, runs):
        if not policy:
            masked.append([at, at + len(text)])
        at += len(text)
    return {"id": problem.id, "source": problem.source, "problem": problem.problem,
            "prompt": tok.prompt(problem.problem), "answer": problem.answer, "extracted": sample.answer,
            "correct": sample.correct, "reward": sample.reward, "response": "".join(texts), "masked": masked,
            "tool_calls": [asdict(call) for call in completion.tool_calls],
            "finish_reason": completion.finish_reason, "truncated": sample.truncated, "void_turn": sample.void_turn,
            "response_tokens": len(completion.response_ids), "policy_tokens": sum(completion.loss_mask),
            "logprob_gap": sample.logprob_gap} | extra


def token_runs(ids: list[int], mask: list[int]) -> list[tuple[list[int], bool]]:
    """``ids`` cut into maximal runs of equal ``mask``: [(ids, sampled by the policy), ...], in order."""
    runs = []
    for token, keep in zip(ids, mask):
        if runs and runs[-1][1] == bool(keep):
            runs[-1][0].append(token)
        else:
            runs.append(([token], bool(keep)))
    return runs


def logged_indices(rewards: list[float], group_size: int, budget: int, rng: random.Random) -> list[int]:
    """Which responses of one step to log: groups in a random order, from each its best (highest reward, first of
    equals) and its worst (lowest, first of equals), then others drawn at random up to :data:`PER_GROUP` (all of a
    smaller group), until ``budget``."""
    order = list(range(len(rewards) // group_size))
    rng.shuffle(order)
    picked = []
    for g in order:
        members = list(range(g * group_size, (g + 1) * group_size))
        best = max(members, key=lambda i: rewards[i])
        worst = min(members, key=lambda i: rewards[i])
        chosen = list(dict.fromkeys([best, worst]))
        others = [i for i in members if i not in chosen]
        chosen += rng.sample(others, min(PER_GROUP - len(chosen), len(others)))
        picked += chosen[:budget - len(picked)]
        if len(picked) >= budget:
            break
    return sorted(picked)


def read_records(file: Path):
    """The records of one samples file. A last line without its newline was cut short by an interrupted write:
    it is skipped."""
    lines = Path(file).read_text().split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                continue
            raise ValueError(f"{file}:{n}: not a sample record ({e.msg}); delete that line to regenerate "
                             f"the sample, or the whole out dir to start over") from None


def drop_after(file: Path, step: int, log=print) -> None:
    """Keep only the JSON lines of ``file`` whose "step" is at most ``step`` (a resumed run drops what a crashed
    one logged after its last checkpoint; a run from step 0 starts afresh; a torn last line is dropped, with one
    line to ``log``: :func:`nanotorl.faults.kept_log_lines`). The lines kept are the file's first ones (steps are
    logged in order): the file is cut after them in one call, which needs no free space (the disk may be full);
    otherwise it is rewritten atomically."""
    if not file.exists():
        return
    keep = kept_log_lines(file, step, log)
    text = "".join(line + "\n" for line in keep).encode()
    if file.read_bytes().startswith(text):
        os.truncate(file, len(text))
        return
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_bytes(text)
    tmp.replace(file)


class SampleLog:
    """Training's samples.jsonl: every rank hands its records to :meth:`write`, rank 0 appends them in one write."""

    def __init__(self, out_dir, rank: int, start: int):
        self.file, self.on = Path(out_dir) / "samples.jsonl", rank == 0
        if self.on:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            drop_after(self.file, start)

    def write(self, records: list[dict]) -> None:
        """Append the records of every rank (all ranks call it, with theirs), rank 0's first."""
        records = dist.gathered_lists(records)
        if self.on and records:
            with self.file.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
