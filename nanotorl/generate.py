"""Continuous-batching generation that pauses a sequence on a closed code fence and resumes it in place.

Token in, token out: every slot keeps the token ids it was given and sampled; the only text ever encoded is a
tool observation. The loop, one step at a time:

  1. free slots take queued requests (continuous batching);
  2. finished sandbox runs become observations ("```output\\n...\\n```\\n"), encoded and queued on their slot;
  3. every running slot feeds its not-yet-cached tokens through the model into its KV cache, all in one
     forward: slots with one token (plain decoding) as one group of rows, slots with more (a new prompt, or an
     observation after a pause) as another, right-padded, in chunks of at most ``prefill_chunk`` tokens
     (the groups share every layer but attention). The decoding rows are consecutive slots, so attention
     reads their cache rows as a view, not a copy: slots in between that are not decoding (paused for the
     tool, prefilling, free) ride along with a filler token whose output is dropped. With ``cuda_graph`` the
     decoding covers every slot with fixed shapes, as a CUDA graph captured per `generate` call and replayed;
  4. one sampler call draws the next token of every slot whose tokens are all cached (with ``cuda_graph``
     the decoding slots draw inside the captured step, slots that just finished a prefill in a second call);
  5. a slot whose policy text now closes a ```python block submits the code to the sandbox and pauses,
     without stalling the others; a slot that wrote an end id (any of the tokenizer's ``eos_ids``, unless
     ``stop_ids`` says otherwise) or ran out of tokens is finished and freed.

Only the observation tokens (plus the fence token sampled just before the pause) are prefilled on resume.
"""
import re
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch

from kernels.sampling import sample
from nanotorl.decode_step import DecodeStep
from nanotorl.model import KVCache

TIMEOUT_MESSAGE = "TimeoutError: the code ran out of time and printed nothing"
FENCE = re.compile(r"```python[^\n]*\n(.*?)```", re.S)          # a closed python block
OUTPUT_TRIGGER = re.compile(r"```python[^\n]*\n(.*?)```.*?```output", re.S)  # ToRL's original stop string


def format_observation(stdout: str, error_line: str | None, ok: bool) -> str:
    """The text ToRL shows the model for one run: stdout if it succeeded, else the last error line; an empty
    result becomes a time-out message; 256 characters or more are cut to the first 128 + "..." + the last 128."""
    text = stdout if ok else (error_line or stdout)
    text = text.strip()
    if not text:
        text = TIMEOUT_MESSAGE
    if len(text) >= 256:
        text = text[:128] + "..." + text[-128:]
    return text


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy
    top_k: int = 0            # 0 => off
    top_p: float = 1.0        # 1 => off
    min_p: float = 0.0        # 0 => off


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 1024   # counts every token after the prompt, tool output included
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    max_tool_calls: int = 1


@dataclass
class ToolCall:
    code: str
    status: str        # the sandbox's status, or 'error' for an empty block / a failed sandbox
    observation: str   # what was inserted between the output fences
    wall_time: float


@dataclass
class Completion:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]       # 1: sampled by the policy, 0: inserted tool output
    logprobs: list[float]      # log-prob of each sampled token under the sampling distribution (0 on tool tokens)
    tool_calls: list[ToolCall]
    finish_reason: str         # 'eos' | 'length' | 'tool_budget'
    prefill_tokens: int = 0    # tokens fed through multi-token (prefill) forwards, prompt included


class _Slot:
    """One live sequence: its request, every token so far, and how many of them are in the KV cache."""

    def __init__(self, index: int, request: Request, order: int):
        self.index, self.request, self.order = index, request, order
        self.tokens = list(request.prompt_ids)
        self.n_cached = 0
        self.out = Completion(list(request.prompt_ids), [], [], [], [], "")
        self.segment_start = 0   # response index where the current policy text (after the last observation) starts
        self.future = None       # pending sandbox run
        self.code = None

    @property
    def waiting(self) -> bool:
        return self.future is not None


class Generator:
    """Batched generation with tool calls for one model. ``trigger``: 'fence' runs a block as soon as it is
    closed; 'output' waits until the model itself writes "```output" (ToRL's original trigger, for base
    Qwen2.5-Math checkpoints that learned to write it). ``cuda_graph``: decode through
    :class:`nanotorl.decode_step.DecodeStep` (every slot, fixed shapes; a CUDA graph on GPU)."""

    def __init__(self, model, tokenizer, sandbox=None, slots: int = 64, max_len: int = 4096,
                 prefill_chunk: int = 512, trigger: str = "fence", stop_ids=None, cuda_graph: bool = False):
        if trigger not in ("fence", "output"):
            raise ValueError(f"trigger must be 'fence' or 'output', got {trigger!r}")
        self.model, self.tokenizer, self.sandbox = model, tokenizer, sandbox
        self.slots, self.max_len, self.prefill_chunk, self.trigger = slots, max_len, prefill_chunk, trigger
        self.stop_ids = set(stop_ids if stop_ids is not None else tokenizer.eos_ids)
        self.cache = None
        self.cuda_graph, self.decode_step = cuda_graph, None
        self.closed = False
        self._tick = {}  # token id -> does its text contain a backtick (only those can close a fence)
        self.stats = {"tool_wait_s": 0.0}

    def close(self):
        """Release the KV cache; later calls raise."""
        self.cache, self.decode_step, self.closed = None, None, True

    def _check(self, r: Request):
        if not r.prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        if len(r.prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(r.prompt_ids)} tokens does not fit the context of {self.max_len} "
                             f"tokens (Generator(max_len=...)); shorten the prompt or raise max_len")
        if r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")

    @torch.no_grad()
    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        """Run every request to completion; results come back in request order. ``progress(n)`` is called with
        the number of newly finished requests (e.g. a tqdm bar's ``update``)."""
        if self.closed:
            raise RuntimeError("this Generator was closed; create a new one")
        for r in requests:
            self._check(r)
        p = next(self.model.parameters())
        if self.cache is None:
            self.cache = KVCache(self.model.cfg, self.slots, self.max_len + self.prefill_chunk,
                                 device=p.device, dtype=p.dtype)
        if self.cuda_graph:  # captured for this call: the weights stay where they are until it returns
            self.decode_step = DecodeStep(self.model, self.cache)
        try:
            return self._generate(requests, progress)
        finally:
            self.decode_step = None

    def _generate(self, requests: list[Request], progress) -> list[Completion]:
        queue, results = deque(enumerate(requests)), [None] * len(requests)
        free, active = list(range(self.slots))[::-1], {}
        while queue or active:
            while queue and free:
                order, req = queue.popleft()
                i = free.pop()
                active[i] = _Slot(i, req, order)
                if self.decode_step is not None:
                    self.decode_step.set_request(i, req)
            finished = self._collect_tool_results(active, block=all(s.waiting for s in active.values()))
            running = [s for s in active.values() if not s.waiting and not s.out.finish_reason]
            finished += self._step(sorted(running, key=lambda s: s.index), active)
            for slot in finished:
                results[slot.order] = slot.out
                del active[slot.index]
                free.append(slot.index)
                if progress is not None:
                    progress(1)
        return results

    def _step(self, running: list[_Slot], active: dict) -> list[_Slot]:
        """Feed uncached tokens, sample the next token where all are cached; return the slots that finished.
        ``running`` is in slot order; ``active`` maps every live slot index to its slot."""
        if not running:
            return []
        prefilling = [s for s in running if len(s.tokens) - s.n_cached > 1]
        decoding = [s for s in running if len(s.tokens) - s.n_cached == 1]
        groups, drawn = [], []  # groups of rows for one forward: (slot indices, token chunks, start positions)
        if prefilling:  # prompts and observations, right-padded, chunked
            chunks = [s.tokens[s.n_cached:s.n_cached + self.prefill_chunk] for s in prefilling]
            groups.append(([s.index for s in prefilling], chunks, [s.n_cached for s in prefilling]))
        if decoding:
            feed = {s.index: (s.tokens[-1], s.n_cached) for s in decoding}
            if self.decode_step is not None:  # every slot, fixed shapes, sampled inside the step
                tokens, logprobs = self.decode_step(self._rows(range(self.slots), feed, active))
                drawn += [(s, tokens[s.index], logprobs[s.index]) for s in decoding]
            else:  # the slots from the first to the last decoding one (or only those)
                span = self._decode_span(decoding)
                fed = self._rows(span, feed, active)
                groups.append((span, [[tok] for tok, _ in fed], [pos for _, pos in fed]))
        hs = self._forward(groups) if groups else []
        ready, last_h = [], []  # slots to sample, and their last hidden states (one tensor per group)
        if prefilling:
            done = []
            for j, (s, chunk) in enumerate(zip(prefilling, groups[0][1])):
                s.out.prefill_tokens += len(chunk)
                s.n_cached += len(chunk)
                if s.n_cached == len(s.tokens):
                    ready.append(s)
                    done.append((j, len(chunk) - 1))
            if done:
                rows, cols = zip(*done)
                last_h.append(hs[0][list(rows), list(cols)])
        if decoding and self.decode_step is None:
            picked = [j for j, i in enumerate(span) if i in feed]
            ready += [active[span[j]] for j in picked]
            last_h.append(hs[-1][picked, 0])
        for s in decoding:
            s.n_cached += 1
        if ready:
            logits = self.model.logits(torch.cat(last_h)).float()  # [R, V]
            tokens, logprobs = self._sample(ready, logits)
            drawn += zip(ready, tokens.tolist(), logprobs.tolist())
        finished = []
        for s, tok, lp in drawn:
            if self._append(s, tok, lp):
                finished.append(s)
        return finished

    @staticmethod
    def _decode_span(decoding: list[_Slot]) -> list[int]:
        """Slot indices of the decoding forward: all from the first to the last decoding slot (consecutive cache
        rows are read as a view) when that at most doubles the rows, else only the decoding slots."""
        lo, hi = decoding[0].index, decoding[-1].index
        if hi - lo + 1 <= 2 * len(decoding):
            return list(range(lo, hi + 1))
        return [s.index for s in decoding]

    @staticmethod
    def _rows(indices, feed: dict, active: dict) -> list[tuple[int, int]]:
        """(token, position) of each slot index of a decoding forward: a decoding slot's from ``feed``; any other
        feeds token 0 just past its slot's tokens (0 for a free slot), where nothing is read before a real token
        is written, not even a chunk that the same forward prefills into that slot; its draw is dropped."""
        return [feed.get(i) or (0, len(active[i].tokens) if i in active else 0) for i in indices]

    def _forward(self, groups: list[tuple[list[int], list[list[int]], list[int]]]) -> list:
        """One forward for groups of (slot indices, token chunks, start positions): each slot's chunk goes in at
        its positions from its start. The chunks of a group are right-padded to one length: the pads write past
        the slot's tokens (the cache has ``prefill_chunk`` spare positions for them), where nothing reads before a
        real token overwrites them. Returns the hidden states [B_i, T_i, D] of each group."""
        dev = self.cache.k.device
        ids, positions, slots = [], [], []
        for indices, chunks, starts in groups:
            T = max(len(c) for c in chunks)
            ids.append(torch.tensor([c + [0] * (T - len(c)) for c in chunks], device=dev))  # [B, T]
            positions.append(torch.tensor(starts, device=dev)[:, None] + torch.arange(T, device=dev))
            slots.append(torch.tensor(indices, device=dev))
        return self.model(ids, positions=positions, cache=self.cache, slots=slots)

    def _sample(self, ready: list[_Slot], logits):
        dev = logits.device
        sp = [s.request.sampling for s in ready]
        return sample(logits,
                      torch.tensor([p.temperature for p in sp], device=dev, dtype=torch.float32),
                      torch.tensor([p.top_k for p in sp], device=dev, dtype=torch.int64),
                      torch.tensor([p.top_p for p in sp], device=dev, dtype=torch.float32),
                      torch.tensor([p.min_p for p in sp], device=dev, dtype=torch.float32),
                      torch.tensor([s.request.seed for s in ready], device=dev, dtype=torch.int64),
                      torch.tensor([len(s.tokens) for s in ready], device=dev, dtype=torch.int64))

    def _append(self, s: _Slot, tok: int, logprob: float) -> bool:
        """Record a sampled token; decide whether the slot finishes, pauses for the tool, or goes on."""
        s.tokens.append(tok)
        out = s.out
        out.response_ids.append(tok)
        out.loss_mask.append(1)
        out.logprobs.append(logprob)
        if tok in self.stop_ids:
            out.finish_reason = "eos"
            return True
        if self._out_of_room(s):
            out.finish_reason = "length"
            return True
        if self._has_tick(tok):
            return self._maybe_call_tool(s)
        return False

    def _out_of_room(self, s: _Slot) -> bool:
        return len(s.out.response_ids) >= s.request.max_new_tokens or len(s.tokens) >= self.max_len

    def _has_tick(self, tok: int) -> bool:
        if tok not in self._tick:
            self._tick[tok] = "`" in self.tokenizer.decode([tok])
        return self._tick[tok]

    def _maybe_call_tool(self, s: _Slot) -> bool:
        """Pause ``s`` on a closed python block (or on "```output" in ToRL's mode); True if it must finish."""
        if self.sandbox is None:
            return False
        text = self.tokenizer.decode(s.out.response_ids[s.segment_start:])
        if self.trigger == "fence":
            if len(s.out.tool_calls) >= s.request.max_tool_calls:
                return False  # budget spent: further blocks stay plain text
            match = FENCE.search(text)
        else:
            match = OUTPUT_TRIGGER.search(text)
            if match and len(s.out.tool_calls) >= s.request.max_tool_calls:
                s.out.finish_reason = "tool_budget"
                return True
        if not match:
            return False
        s.code = match.group(1)
        if not s.code.strip():
            s.future = _done(ToolCall(s.code, "error", "SyntaxError: empty code block", 0.0))
            return False
        try:
            s.future = self.sandbox.submit(s.code)
        except Exception as e:  # the sandbox itself failed: the model sees an error, training goes on
            s.future = _done(ToolCall(s.code, "error", f"SandboxError: {e}", 0.0))
        return False

    def _collect_tool_results(self, active: dict, block: bool) -> list[_Slot]:
        """Turn finished sandbox runs into observation tokens on their slots (waiting for one if ``block``);
        return the slots that the observation left without room to go on."""
        pending = [s.future for s in active.values() if s.waiting]
        if not pending:
            return []
        if block:
            t0 = time.perf_counter()
            wait(pending, return_when=FIRST_COMPLETED)
            self.stats["tool_wait_s"] += time.perf_counter() - t0
        finished = []
        for s in active.values():
            if s.waiting and s.future.done():
                if self._insert_observation(s, self._tool_call(s)):
                    finished.append(s)
        return finished

    def _tool_call(self, s: _Slot) -> ToolCall:
        try:
            result = s.future.result()
        except Exception as e:
            return ToolCall(s.code, "error", f"SandboxError: {e}", 0.0)
        if isinstance(result, ToolCall):
            return result
        text = format_observation(result.stdout, result.error_line, result.status == "ok")
        return ToolCall(s.code, result.status, text, result.wall_time)

    def _insert_observation(self, s: _Slot, call: ToolCall) -> bool:
        """Append the observation (mask 0) to the slot; its uncached tokens, the fence token sampled before the
        pause and the observation, are prefilled by the next step. True if no room is left to go on."""
        s.future = None
        s.out.tool_calls.append(call)
        written = self.tokenizer.decode(s.out.response_ids[-8:])
        head = "" if written.endswith("\n") else "\n"
        if self.trigger == "fence":
            head += "```output\n"
        ids = self.tokenizer.encode(f"{head}{call.observation}\n```\n")
        room = min(s.request.max_new_tokens - len(s.out.response_ids), self.max_len - len(s.tokens))
        ids = ids[:room]
        s.tokens += ids
        s.out.response_ids += ids
        s.out.loss_mask += [0] * len(ids)
        s.out.logprobs += [0.0] * len(ids)
        s.segment_start = len(s.out.response_ids)
        if self._out_of_room(s):
            s.out.finish_reason = "length"
            return True
        return False


def _done(value) -> Future:
    """A future that already holds ``value`` (for tool calls that need no sandbox run)."""
    f = Future()
    f.set_result(value)
    return f
