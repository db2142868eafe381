"""ToRL's own rollout loop on Hugging Face ``generate``: the baseline of ``bench.rollout``.

ToRL (its verl rollout) generates the whole batch with a stop string, runs the code of every row that stopped on a
tool call, appends the observation to those rows and generates them again from their full token ids (prompt,
response so far, observation: a full re-prefill), up to C times. Here on HF ``generate``, as well as it can do it:

- one ``generate`` call per turn for every row still going, left-padded, sampling from the same distribution as
  ours (``do_sample``, the temperature, ``top_k=0``: HF's default of 50 would cut the distribution, ``top_p`` 1),
  every end id of the tokenizer as ``eos_token_id``, and ``max_new_tokens`` the largest budget left (each row is cut
  to its own afterwards);
- a row stops where our generator pauses: a stopping criterion fires on the same rule (:func:`fired_code`), checked
  only on rows whose newest token could fire a call (it holds a line end: a call fires at the end of a line);
- HF ``generate`` keeps a finished row in the batch: it is fed pad tokens through every layer until the last row
  ends; the call returns as soon as every row has ended (eos, the stop, or its budget), the most it allows;
- the code of every stopped row is submitted to the sandbox before any result is awaited (the runs overlap), and
  the observation is the very text our generator inserts (:func:`nanotorl.tool.observation_block`).
"""
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from nanotorl.generate import Completion
from nanotorl.fences import tool_call
from nanotorl.tool import ToolCall, finished_call, observation_block, submit


def fired_code(text: str, trigger: str) -> str | None:
    """The code of the tool call that the policy text since the last observation makes, or None: the generator's
    rule (:func:`nanotorl.fences.tool_call`)."""
    call = tool_call(text, trigger)
    return None if call is None else call.code


class ToolStop(StoppingCriteria):
    """Stops each row of one ``generate`` call at the token where it makes a tool call; records that length and
    the code. ``context``: the (padded) length of the input, where this turn's text starts."""

    def __init__(self, tok, may_fire: torch.Tensor, context: int, trigger: str):
        self.tok, self.may_fire, self.context, self.trigger = tok, may_fire, context, trigger
        self.fired = {}  # row -> (new tokens up to the call, code)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        rows = self.may_fire[input_ids[:, -1]].nonzero()[:, 0].tolist()  # rows whose newest token may fire
        for row in rows:
            if row not in self.fired:
                code = fired_code(self.tok.decode(input_ids[row, self.context:].tolist()), self.trigger)
                if code is not None:
                    self.fired[row] = (input_ids.shape[1] - self.context, code)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[list(self.fired)] = True
        return done


@dataclass
class Row:
    """One response of the loop."""
    prompt: list[int]
    budget: int                          # tokens it may still add
    response: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    finish: str = ""

    def add(self, ids: list[int], sampled: bool):
        ids = ids[:self.budget]
        self.response += ids
        self.mask += [int(sampled)] * len(ids)
        self.budget -= len(ids)
        if not self.budget:
            self.finish = self.finish or "length"


def torl_loop(hf, tok, sandbox, prompts: list[list[int]], *, max_new_tokens: int, max_tool_calls: int,
              trigger: str, temperature: float, seed: int, may_fire: torch.Tensor) -> tuple[list[Completion], int]:
    """Completions in the order of ``prompts`` and the tokens prefilled (padded rows x length, every call)."""
    torch.manual_seed(seed)
    rows = [Row(list(p), max_new_tokens) for p in prompts]
    todo, prefilled, end = rows, 0, set(tok.eos_ids)
    for turn in range(max_tool_calls + 1):
        last = turn == max_tool_calls
        contexts = [r.prompt + r.response for r in todo]
        width = max(map(len, contexts))
        ids = torch.tensor([[tok.pad_id] * (width - len(c)) + c for c in contexts])   # [B, P], left-padded
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
        stop = ToolStop(tok, may_fire, width, trigger)
        watch = not last or trigger == "output"  # with C spent, 'output' still ends a row (ours: tool_budget)
        out = hf.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=temperature, top_k=0,
                          top_p=1.0, max_new_tokens=max(r.budget for r in todo), eos_token_id=tok.eos_ids,
                          pad_token_id=tok.pad_id, stopping_criteria=StoppingCriteriaList([stop] if watch else []))
        prefilled += ids.numel()
        fired = []
        for b, (r, new) in enumerate(zip(todo, out[:, width:].tolist())):
            cut, code = stop.fired.get(b, (len(new), None))
            ended = next((j + 1 for j, t in enumerate(new[:cut]) if t in end), None)
            fits = (ended or cut) <= r.budget
            r.add(new[:ended or cut], sampled=True)  # out of budget: finished as 'length'
            if ended is not None and fits:
                r.finish = "eos"
            elif code is not None and not r.finish:
                if last:
                    r.finish = "tool_budget"
                else:
                    fired.append((r, code))
        futures = [(r, code, submit(sandbox, code)) for r, code in fired]  # every run starts before any is awaited
        for r, code, future in futures:
            call = finished_call(future, code)
            r.calls.append(call)
            r.add(tok.encode(observation_block(tok.decode(r.response[-8:]), call.observation, trigger)), sampled=False)
        todo = [r for r, _ in fired if not r.finish]
        if not todo:
            break
    return [Completion(r.prompt, r.response, r.mask, [0.0] * len(r.response), r.calls, r.finish or "length")
            for r in rows], prefilled
