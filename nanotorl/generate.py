"""Continuous-batching generation that pauses a sequence on a closed code fence and resumes it in place.

Token in, token out: every slot keeps the token ids it was given and sampled; the only text ever encoded is a
tool observation (what the model sees of the tool is in ``nanotorl/tool.py``). The loop, one step at a time:

  1. free slots take queued requests (continuous batching);
  2. finished sandbox runs become observations ("```output\\n...\\n```\\n"), encoded and queued on their slot;
  3. schedule (``_schedule``): slots with more than one uncached token (a new prompt, or an observation after a
     pause) prefill, in chunks of at most ``prefill_chunk`` tokens; slots with one (the token drawn last step)
     decode;
  4. forward (``_forward``): every running slot feeds its uncached tokens through the model into its KV cache,
     all in one forward, the prefill chunks as one group of rows (right-padded) and the decoding tokens as
     another (the groups share every layer but attention). The decoding rows are consecutive slots, so
     attention reads their cache rows as a view, not a copy: slots in between that are not decoding (paused
     for the tool, prefilling, free) ride along with a filler token whose output is dropped. With
     ``cuda_graph`` the decoding covers every slot with fixed shapes instead (``_decode_in_graph``: a CUDA graph
     captured per `generate` call and replayed, which also draws their tokens);
  5. sample (``_sample``): one sampler call draws the next token of every slot whose tokens are all cached;
  6. advance (``_advance``): a slot that wrote an end id (any of the tokenizer's ``eos_ids``, unless ``stop_ids``
     says otherwise) or ran out of tokens is finished and freed; one whose policy text now makes a tool call
     (a closed ```python block, or ToRL's ```output line: :mod:`nanotorl.fences`) submits the code to the
     sandbox and pauses, without stalling the others. Each slot reads its text incrementally: a
     :class:`nanotorl.fences.Scanner` takes each new token's bytes, and nothing is decoded again.

Only the observation tokens (plus the fence token sampled just before the pause) are prefilled on resume.
"""
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import torch

from kernels.sampling import sample
from nanotorl.decode_step import DecodeStep
from nanotorl.fences import Scanner
from nanotorl.model import KVCache
from nanotorl.tool import ToolCall, finished_call, observation_block, submit

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
        self.scanner = None      # reads the policy text since the last observation (None: no call can fire)
        self.future = None       # pending sandbox run
        self.code = None

    @property
    def waiting(self) -> bool:
        return self.future is not None


class Generator:
    """Batched generation with tool calls for one model. ``trigger``: 'fence' runs a block as soon as it is
    closed; 'output' waits until the model itself writes "```output" (ToRL's original trigger, for base
    Qwen2.5-Math checkpoints that learned to write it); the exact rules are in :mod:`nanotorl.fences`.
    ``cuda_graph``: decode through :class:`nanotorl.decode_step.DecodeStep` (every slot, fixed shapes; a CUDA
    graph on GPU)."""

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
                active[i].scanner = self._scanner(active[i])
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
        """Schedule, forward, sample, advance: feed every running slot its uncached tokens, draw the next token of
        each slot whose tokens are then all cached, and append it; return the slots that finished.
        ``running`` is in slot order; ``active`` maps every live slot index to its slot."""
        prefill, decode = _schedule(running)
        drawn = []  # (slot, token, log-prob), in the order the slots advance
        if decode and self.decode_step is not None:
            drawn += self._decode_in_graph(decode, active)
            decode = []
        ready, last_h = self._forward(prefill, decode, active)
        if ready:
            drawn += self._sample(ready, last_h)
        return [s for s, tok, logprob in drawn if self._advance(s, tok, logprob)]

    def _decode_in_graph(self, decode: list[_Slot], active: dict) -> list[tuple[_Slot, int, float]]:
        """The decoding slots' next tokens from :class:`DecodeStep`: every slot in one fixed-shape step (the others
        as fillers) that writes the KV cache and samples inside; (slot, token, log-prob) per decoding slot."""
        fed = {s.index: (s.tokens[-1], s.n_cached) for s in decode}
        tokens, logprobs = self.decode_step(self._decode_rows(range(self.slots), fed, active))
        for s in decode:
            s.n_cached += 1
        return [(s, tokens[s.index], logprobs[s.index]) for s in decode]

    def _forward(self, prefill: list[_Slot], decode: list[_Slot], active: dict) -> tuple[list[_Slot], torch.Tensor]:
        """One model forward of the prefill chunks and the decoding tokens, written into the KV cache; returns the
        slots whose tokens are then all cached (prefilled ones first) and their last hidden states [R, D]. A
        prefilling slot whose tokens are another's (the samples of one prompt) is not fed: :meth:`_copy_twins`."""
        prefill, twins = _twins(prefill, self.prefill_chunk)
        groups = []  # rows that share every layer of the forward but attention
        if prefill:
            groups.append(self._prefill_group(prefill))
        if decode:
            groups.append(self._decode_group(decode, active))
        if not groups:
            return [], None
        hidden = self._run_groups(groups)  # [B_i, T_i, D] per group
        for s in prefill:
            fed = min(len(s.tokens) - s.n_cached, self.prefill_chunk)
            s.out.prefill_tokens += fed
            s.n_cached += fed
        for s in decode:
            s.n_cached += 1
        ready = [s for g in groups for s in g.ready]
        last_h = [h[[row for row, _ in g.last], [col for _, col in g.last]] for g, h in zip(groups, hidden) if g.ready]
        last_h = torch.cat(last_h) if ready else None
        return self._copy_twins(twins, ready, last_h) if twins else (ready, last_h)

    def _copy_twins(self, twins: list[tuple[_Slot, _Slot]], ready: list[_Slot], last_h: torch.Tensor):
        """Each (slot, twin) of :func:`_twins`: the slot takes the cache rows its twin was just fed and, if they
        complete it, its twin's last hidden state; returns ``ready`` and ``last_h`` [R, D] with those slots added."""
        row = {s.index: r for r, s in enumerate(ready)}
        done = []  # (slot, row of its twin's hidden state)
        for s, twin in twins:
            self.cache.copy_positions(twin.index, s.index, s.n_cached, twin.n_cached)
            s.n_cached = twin.n_cached
            if twin.index in row:
                done.append((s, row[twin.index]))
        if not done:
            return ready, last_h
        return ready + [s for s, _ in done], torch.cat([last_h, last_h[[r for _, r in done]]])

    def _prefill_group(self, prefill: list[_Slot]) -> "_Group":
        """The next chunk (at most ``prefill_chunk`` tokens) of every prefilling slot; ready: those it completes."""
        chunks = [s.tokens[s.n_cached:s.n_cached + self.prefill_chunk] for s in prefill]
        last = [(row, len(chunk) - 1) for row, (s, chunk) in enumerate(zip(prefill, chunks))
                if s.n_cached + len(chunk) == len(s.tokens)]
        return _Group([s.index for s in prefill], chunks, [s.n_cached for s in prefill],
                      ready=[prefill[row] for row, _ in last], last=last)

    def _decode_group(self, decode: list[_Slot], active: dict) -> "_Group":
        """One token per slot of the decoding span (:func:`_decode_span`): each decoding slot's last token, fillers
        for the slots between them; ready: the decoding slots."""
        span = _decode_span(decode)
        fed = {s.index: (s.tokens[-1], s.n_cached) for s in decode}
        rows = self._decode_rows(span, fed, active)
        return _Group(span, [[tok] for tok, _ in rows], [pos for _, pos in rows],
                      ready=decode, last=[(row, 0) for row, i in enumerate(span) if i in fed])

    @staticmethod
    def _decode_rows(indices, fed: dict, active: dict) -> list[tuple[int, int]]:
        """(token, position) of each slot index of a decoding forward: a decoding slot's from ``fed``; any other
        feeds token 0 just past its slot's tokens (0 for a free slot), where nothing is read before a real token
        is written, not even a chunk that the same forward prefills into that slot; its draw is dropped."""
        return [fed.get(i) or (0, len(active[i].tokens) if i in active else 0) for i in indices]

    def _run_groups(self, groups: list["_Group"]) -> list[torch.Tensor]:
        """One forward of the groups: each slot's chunk goes in at its positions from its start. The chunks of a
        group are right-padded to one length: the pads write past the slot's tokens (the cache has
        ``prefill_chunk`` spare positions for them), where nothing reads before a real token overwrites them.
        Returns the hidden states [B_i, T_i, D] of each group."""
        dev = self.cache.k.device
        ids, positions, slots = [], [], []
        for g in groups:
            T = max(len(c) for c in g.chunks)
            ids.append(torch.tensor([c + [0] * (T - len(c)) for c in g.chunks], device=dev))  # [B, T]
            positions.append(torch.tensor(g.starts, device=dev)[:, None] + torch.arange(T, device=dev))
            slots.append(torch.tensor(g.slots, device=dev))
        return self.model(ids, positions=positions, cache=self.cache, slots=slots)

    def _sample(self, ready: list[_Slot], last_h: torch.Tensor) -> list[tuple[_Slot, int, float]]:
        """One sampler call for every ready slot (its own sampling parameters, seed and offset): (slot, token,
        log-prob) from the last hidden states [R, D]."""
        logits = self.model.logits(last_h).float()  # [R, V]
        dev = logits.device
        sp = [s.request.sampling for s in ready]
        tokens, logprobs = sample(logits,
                                  torch.tensor([p.temperature for p in sp], device=dev, dtype=torch.float32),
                                  torch.tensor([p.top_k for p in sp], device=dev, dtype=torch.int64),
                                  torch.tensor([p.top_p for p in sp], device=dev, dtype=torch.float32),
                                  torch.tensor([p.min_p for p in sp], device=dev, dtype=torch.float32),
                                  torch.tensor([s.request.seed for s in ready], device=dev, dtype=torch.int64),
                                  torch.tensor([len(s.tokens) for s in ready], device=dev, dtype=torch.int64))
        return list(zip(ready, tokens.tolist(), logprobs.tolist()))

    def _advance(self, s: _Slot, tok: int, logprob: float) -> bool:
        """Append a drawn token to its slot, then finish the slot (eos, out of room), pause it for the tool (a
        tool call) or let it go on; True if it finished."""
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
        if s.scanner is not None:
            code = s.scanner.feed(self.tokenizer.token_bytes(tok))
            if code is not None:
                return self._call_tool(s, code)
        return False

    def _out_of_room(self, s: _Slot) -> bool:
        return len(s.out.response_ids) >= s.request.max_new_tokens or len(s.tokens) >= self.max_len

    def _scanner(self, s: _Slot) -> Scanner | None:
        """A scanner for the slot's next stretch of policy text, or None when no call can fire there: no sandbox,
        or the tool budget spent with trigger 'fence' (further blocks are text). With trigger 'output' a spent
        budget still watches for the trigger, which then ends the response, as in ToRL."""
        if self.sandbox is None or (self.trigger == "fence" and len(s.out.tool_calls) >= s.request.max_tool_calls):
            return None
        return Scanner(self.trigger)

    def _call_tool(self, s: _Slot, code: str) -> bool:
        """Submit ``code`` and pause ``s``; True if it must finish instead ('output' trigger, budget spent)."""
        if len(s.out.tool_calls) >= s.request.max_tool_calls:
            s.out.finish_reason = "tool_budget"
            return True
        s.code = code
        s.future = submit(self.sandbox, code)
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
                if self._insert_observation(s, finished_call(s.future, s.code)):
                    finished.append(s)
        return finished

    def _insert_observation(self, s: _Slot, call: ToolCall) -> bool:
        """Append the observation (mask 0) to the slot; its uncached tokens, the fence token sampled before the
        pause and the observation, are prefilled by the next step. True if no room is left to go on."""
        s.future = None
        s.out.tool_calls.append(call)
        written = self.tokenizer.decode(s.out.response_ids[-8:])
        ids = self.tokenizer.encode(observation_block(written, call.observation, self.trigger))
        room = min(s.request.max_new_tokens - len(s.out.response_ids), self.max_len - len(s.tokens))
        ids = ids[:room]
        s.tokens += ids
        s.out.response_ids += ids
        s.out.loss_mask += [0] * len(ids)
        s.out.logprobs += [0.0] * len(ids)
        s.scanner = self._scanner(s)
        if self._out_of_room(s):
            s.out.finish_reason = "length"
            return True
        return False


@dataclass
class _Group:
    """Rows of one forward, one per slot: its index, the tokens it feeds and the position of the first. ``ready``:
    the slots whose tokens the group caches to the last, with the (row, column) of that last token in ``last``."""
    slots: list[int]
    chunks: list[list[int]]
    starts: list[int]
    ready: list[_Slot]
    last: list[tuple[int, int]]


def _schedule(running: list[_Slot]) -> tuple[list[_Slot], list[_Slot]]:
    """(prefill, decode): the running slots with several uncached tokens (a new prompt, or an observation after a
    pause, fed in chunks) and those with one (the token drawn last step), each in slot order."""
    return ([s for s in running if len(s.tokens) - s.n_cached > 1],
            [s for s in running if len(s.tokens) - s.n_cached == 1])


def _twins(prefill: list[_Slot], chunk: int) -> tuple[list[_Slot], list[tuple[_Slot, _Slot]]]:
    """(fed, twins): the prefilling slots to feed, in slot order, and (slot, twin) for every other one: a slot whose
    tokens from the first to the end of this chunk are those of an earlier slot that is fed, its twin (the G samples
    of one prompt). The twins' caches then hold the same keys and values, so the slot copies them."""
    fed, twins, first = [], [], {}
    for s in prefill:
        twin = first.setdefault((s.n_cached, tuple(s.tokens[:s.n_cached + chunk])), s)
        if twin is s:
            fed.append(s)
        else:
            twins.append((s, twin))
    return fed, twins


def _decode_span(decode: list[_Slot]) -> list[int]:
    """Slot indices of the decoding forward: all from the first to the last decoding slot (consecutive cache rows
    are read as a view) when that at most doubles the rows, else only the decoding slots."""
    lo, hi = decode[0].index, decode[-1].index
    if hi - lo + 1 <= 2 * len(decode):
        return list(range(lo, hi + 1))
    return [s.index for s in decode]
