"""Continuous-batching generation that pauses a sequence on a closed code fence and resumes it in place.

Token in, token out: every slot keeps the token ids it was given and sampled, in a :class:`nanotorl.slots.SlotTable`
on the model's device; the only text ever encoded is a tool observation (what the model sees of the tool is in
``nanotorl/tool.py``). The loop, one step at a time:

  1. free slots take queued requests (continuous batching);
  2. finished sandbox runs become observations ("```output\\n...\\n```\\n"), encoded and written into their slots;
  3. schedule: slots with more than one uncached token (a new prompt, or an observation after a pause) prefill, in
     chunks of at most ``prefill_chunk`` tokens; the others decode their last drawn token. The samples of one
     prompt prefill it once (:func:`_twins`);
  4. forward (``_forward``): every running slot feeds its uncached tokens through the model into its KV cache,
     all in one forward, the prefill chunks as one group of rows (right-padded) and the decoding tokens as
     another (the groups share every layer but attention). The decoding rows are consecutive slots, so
     attention reads their cache rows as a view, not a copy: slots in between that are not decoding (paused
     for the tool, prefilling, free) ride along with a filler token whose output is dropped. With
     ``cuda_graph`` the decoding covers every slot with fixed shapes instead (a CUDA graph captured per
     `generate` call and replayed, which also draws their tokens);
  5. sample (``_sample``): one sampler call draws the next token of every slot whose tokens are all cached;
  6. advance (``_advance``): the drawn tokens are appended on the device, and one test finds the slots the host must
     look at: a slot that wrote an end id (any of the tokenizer's ``eos_ids``, unless ``stop_ids`` says otherwise)
     or is full is finished and freed; one that ended a line is read by its :class:`nanotorl.fences.Scanner`
     (the line's bytes, nothing decoded again), and if its policy text now makes a tool call (a closed ```python
     block, or ToRL's ```output line: :mod:`nanotorl.fences`) it submits the code to the sandbox and pauses,
     without stalling the others. The rest only decode on: the host does nothing for them.

Only the observation tokens (plus the token sampled just before the pause) are prefilled on resume.
"""
import itertools
import time
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import torch

from nanotorl.kernels.sampling import sample
from nanotorl.batch import DecodeRows, prefill_groups, twins
from nanotorl.compiled_decode import CompiledDecode
from nanotorl.decode_step import DecodeStep
from nanotorl.dist import hooks_bypassed
from nanotorl.fences import Scanner, line_ends
from nanotorl.model import KVCache, Qwen2
from nanotorl.slots import SlotTable
from nanotorl.tool import COMPAT, ToolCall, finished_call, observation_block, submit

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
    """One live sequence as the host sees it; its tokens are in the slot table. ``n_tokens`` and ``n_cached`` are
    kept while the slot prefills or waits; while it decodes, the table's ``length`` is the count (read back when it
    stops), and every token but the last drawn one is cached."""

    def __init__(self, index: int, request: Request, order: int):
        self.index, self.request, self.order = index, request, order
        self.n_tokens, self.n_cached = len(request.prompt_ids), 0
        self.line_start = self.n_tokens  # the first token of the policy text's current line
        self.tool_spans = []             # (start, end) of each observation in the slot
        self.tool_calls = []
        self.limit = 0                   # the slot is full at this many tokens (prompt and max_new_tokens, max_len)
        self.prefill_tokens = 0
        self.finish_reason = ""
        self.scanner = None              # reads the policy text since the last observation (None: no call can fire)
        self.future = None               # pending sandbox run
        self.code = None

    @property
    def waiting(self) -> bool:
        return self.future is not None


class Generator:
    """Batched generation with tool calls for one model. ``trigger``: 'fence' runs a block as soon as it is
    closed; 'output' waits until the model itself writes "```output" (ToRL's original trigger, for base
    Qwen2.5-Math checkpoints that learned to write it); the exact rules are in :mod:`nanotorl.fences`.
    ``cuda_graph``: decode through :class:`nanotorl.decode_step.DecodeStep` (every slot, fixed shapes; a CUDA
    graph on GPU; if the capture fails, eagerly, with a warning that names why). An FSDP2 model generates inside
    ``dist.gathered``: its calls skip FSDP2's hooks (``dist.hooks_bypassed``). ``compat``: 'torl' follows ToRL's own
    code (trigger 'output' only): its observation text (:func:`nanotorl.tool.torl_observation`) and its budget rule
    (a spent budget makes further calls text). ``compile``: on a CPU, decode through
    :class:`nanotorl.compiled_decode.CompiledDecode` (``torch.compile``; the first call compiles)."""

    def __init__(self, model, tokenizer, sandbox=None, slots: int = 64, max_len: int = 4096,
                 prefill_chunk: int = 512, trigger: str = "fence", stop_ids=None, cuda_graph: bool = False,
                 compat: str = "none", compile: bool = False):
        if trigger not in ("fence", "output"):
            raise ValueError(f"trigger must be 'fence' or 'output', got {trigger!r}")
        if compat not in COMPAT:
            raise ValueError(f"compat must be one of {list(COMPAT)}, got {compat!r}")
        if compat == "torl" and trigger != "output":
            raise ValueError(f"compat 'torl' needs trigger 'output' (ToRL's stop string), got trigger {trigger!r}: "
                             f"pass --trigger output, or --compat none")
        self.compat = compat
        self.model, self.tokenizer, self.sandbox = model, tokenizer, sandbox
        self.slots, self.max_len, self.prefill_chunk, self.trigger = slots, max_len, prefill_chunk, trigger
        self.stop_ids = set(stop_ids if stop_ids is not None else tokenizer.eos_ids)
        self.cache = self.table = None
        self.cuda_graph, self.decode_step = cuda_graph, None
        if compile and not (hasattr(model, "decode") or isinstance(model, Qwen2)):
            raise TypeError(f"compile=True compiles nanotorl's Qwen2 decoding forward; {type(model).__name__} is not a "
                            f"Qwen2 and has no decode() of its own (nanotorl.compiled_decode)")
        self.compiled = CompiledDecode(model) if compile else None
        self.closed = False
        self.stats = {"tool_wait_s": 0.0}

    def close(self):
        """Release the KV cache; later calls raise."""
        self.release()
        self.closed = True

    def release(self):
        """Drop the KV cache and the slot table, so that the caching allocator can give their memory to training;
        the next ``generate`` allocates them again."""
        self.cache, self.table, self.decode_step = None, None, None

    def _check(self, r: Request):
        if not r.prompt_ids:
            raise ValueError("empty prompt: a request needs at least one prompt token")
        if len(r.prompt_ids) >= self.max_len:
            raise ValueError(f"prompt of {len(r.prompt_ids)} tokens does not fit the context of {self.max_len} "
                             f"tokens (Generator(max_len=...)); shorten the prompt or raise max_len")
        if r.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {r.max_new_tokens}")

    @torch.inference_mode()  # as no_grad, and no view or version tracking: each op of a forward costs less
    def generate(self, requests: list[Request], progress=None) -> list[Completion]:
        """Run every request to completion; results come back in request order. ``progress(n)`` is called with
        the number of newly finished requests (e.g. a tqdm bar's ``update``)."""
        if self.closed:
            raise RuntimeError("this Generator was closed; create a new one")
        for r in requests:
            self._check(r)
        p = next(self.model.parameters())
        if self.compiled is not None and p.device.type != "cpu":
            raise ValueError(f"compile=True compiles the CPU decoding forward; the model is on {p.device}, where "
                             f"the decode step is a CUDA graph (cuda_graph=True, --cuda-graph)")
        if self.cache is None:
            self.cache = KVCache(self.model.cfg, self.slots, self.max_len + self.prefill_chunk,
                                 device=p.device, dtype=p.dtype)
            self.table = SlotTable(self.slots, self.max_len, *self._token_tables(), device=p.device)
        if self.cuda_graph:  # captured for this call: the weights stay where they are until it returns
            self.decode_step = self._decode_step()
        try:  # the weights are whole (dist.gathered): FSDP2's hooks would only add their launches to every step
            with hooks_bypassed(self.model):
                return self._generate(requests, progress)
        finally:
            self.decode_step = None

    def _decode_step(self) -> DecodeStep | None:
        """The captured decode step, or None when the capture fails: then this generator decodes eagerly from here
        on, and says why once."""
        try:
            return DecodeStep(self.model, self.cache, params=self.table.params)
        except RuntimeError as e:
            self.cuda_graph = False
            warnings.warn(f"cuda_graph: decoding eagerly, the decode step could not be captured: {e}", RuntimeWarning)
            return None

    def _token_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[V] bool each: the stop ids, and the tokens whose bytes hold a line end."""
        V = self.model.cfg.vocab_size
        stop = torch.zeros(V, dtype=torch.bool)
        stop[[i for i in self.stop_ids if i < V]] = True
        ends = line_ends(self.tokenizer)[:V]  # ids past the tokenizer's (a padded embedding) hold no line end
        line_end = torch.zeros(V, dtype=torch.bool)
        line_end[:len(ends)] = torch.tensor(ends, dtype=torch.bool)
        return stop, line_end

    def _generate(self, requests: list[Request], progress) -> list[Completion]:
        queue, results = deque(enumerate(requests)), [None] * len(requests)
        free, self.active, self.prefilling, self.decoding = list(range(self.slots))[::-1], {}, {}, {}
        self._rows = None  # the decoding group's layout, rebuilt when a slot starts or stops decoding
        while queue or self.active:
            while queue and free:
                order, req = queue.popleft()
                self._admit(_Slot(free.pop(), req, order))
            finished = self._collect_tool_results(block=all(s.waiting for s in self.active.values()))
            finished += self._step()
            for s in finished:
                results[s.order] = self._completion(s)
                for live in (self.active, self.prefilling, self.decoding):
                    live.pop(s.index, None)
                self._rows = None
                free.append(s.index)
                if progress is not None:
                    progress(1)
        return results

    def _admit(self, s: _Slot):
        req = s.request
        s.scanner = self._scanner(s)
        s.limit = min(len(req.prompt_ids) + req.max_new_tokens, self.max_len)  # full at this many tokens
        self.table.admit(s.index, req, s.limit, watch=s.scanner is not None)
        self.active[s.index] = s
        self._schedule(s)

    def _schedule(self, s: _Slot):
        """A slot with uncached tokens prefills if it has several, else decodes (a one-token prompt)."""
        if s.n_tokens - s.n_cached > 1:
            self.prefilling[s.index] = s
        else:
            self.prefilling.pop(s.index, None)
            self.decoding[s.index] = s
            self._rows = None

    def _decode_rows(self) -> DecodeRows | None:
        if self._rows is None and self.decoding:
            self._rows = DecodeRows(sorted(self.decoding.values(), key=lambda s: s.index), self.slots,
                                    self.table.length.device)
        return self._rows

    def _step(self) -> list[_Slot]:
        """Schedule, forward, sample, advance: feed every running slot its uncached tokens, draw the next token of
        each slot whose tokens are then all cached, and append it; return the slots that finished."""
        prefill = sorted(self.prefilling.values(), key=lambda s: s.index)
        rows = self._decode_rows()
        drawn = []  # (slots, their indices [R], tokens [R], log-probs [R]) in the order the slots advance
        if rows is not None and self.decode_step is not None:
            tokens, logprobs = self.decode_step(*self.table.decode_inputs(rows.all_slots, rows.all_decoding))
            drawn.append((rows.slots, rows.idx, tokens[rows.idx], logprobs[rows.idx]))
            rows = None
        ready, idx, last_h = self._forward(prefill, rows)
        if ready:
            drawn.append((ready, idx, *self._sample(idx, last_h)))
        for s in ready:
            if s.index in self.prefilling:
                self._schedule(s)  # all cached now: it decodes from here on
        if not drawn:
            return []
        slots, idx, tokens, logprobs = zip(*drawn)
        return self._advance(sum(slots, []), torch.cat(idx), torch.cat(tokens), torch.cat(logprobs))

    def _forward(self, prefill: list[_Slot], rows: DecodeRows | None):
        """One model forward of the prefill chunks and the decoding tokens, written into the KV cache; returns the
        slots whose tokens are then all cached (prefilled ones first), their indices [R] and last hidden states
        [R, D]. A slot whose prompt is another's is not fed: :meth:`_copy_twins`."""
        prefill, pairs = twins(prefill, self.prefill_chunk)
        groups = prefill_groups(self.table, prefill, self.prefill_chunk) + \
                 ([rows.group(self.table)] if rows is not None else [])
        if not groups:
            return [], None, None
        compiled = rows is not None and self.compiled is not None
        eager = groups[:-1] if compiled else groups
        hidden = self.model([g.ids for g in eager], positions=[g.positions for g in eager], cache=self.cache,
                            slots=[g.slots for g in eager]) if eager else []  # [B_i, T_i, D] per group
        if compiled:  # the decoding group, through the compiled forward
            g = groups[-1]
            hidden.append(self.compiled(self.cache, g.ids[:, 0], g.positions[:, 0], g.slots)[:, None])
        for s in prefill:
            fed = min(s.n_tokens - s.n_cached, self.prefill_chunk)
            s.prefill_tokens += fed
            s.n_cached += fed
        done = [(g, h) for g, h in zip(groups, hidden) if g.ready]
        ready = [s for g, _ in done for s in g.ready]
        idx = torch.cat([g.ready_idx for g, _ in done]) if done else None
        last_h = torch.cat([h.flatten(0, 1)[g.last] for g, h in done]) if done else None
        return self._copy_twins(pairs, ready, idx, last_h) if pairs else (ready, idx, last_h)

    def _copy_twins(self, pairs: list[tuple[_Slot, _Slot]], ready: list[_Slot], idx, last_h):
        """Each (slot, twin) of :func:`nanotorl.batch.twins`: the slot takes the cache rows its twin was just fed
        and, if they complete it, its twin's last hidden state; returns ``ready``, ``idx`` and ``last_h`` with
        those slots added."""
        row = {s.index: r for r, s in enumerate(ready)}
        done = []  # (slot, row of its twin's hidden state)
        for s, twin in pairs:
            self.cache.copy_positions(twin.index, s.index, s.n_cached, twin.n_cached)
            s.n_cached = twin.n_cached
            if twin.index in row:
                done.append((s, row[twin.index]))
        if not done:
            return ready, idx, last_h
        extra = torch.tensor([s.index for s, _ in done], device=idx.device)
        return ready + [s for s, _ in done], torch.cat([idx, extra]), torch.cat([last_h, last_h[[r for _, r in done]]])

    def _sample(self, idx: torch.Tensor, last_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One sampler call for the slots ``idx [R]`` (each its own parameters, seed and offset): tokens [R] and
        log-probs [R] from the last hidden states [R, D]."""
        return sample(self.model.logits(last_h).float(), *self.table.sampling(idx))

    def _advance(self, slots: list[_Slot], idx: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor):
        """Append the drawn tokens to their slots; the host then looks only at the slots the table flags: finish
        those that wrote an end id or are full, read the line a slot ended (it may pause for the tool). Returns
        the slots that finished."""
        finished, lines = [], []  # lines: (slot, its length) of the slots that ended a line
        for row, stopped, full, line_end, length in self.table.append(idx, tokens, logprobs):
            s = slots[row]
            if stopped or full:
                s.n_tokens, s.finish_reason = length, "eos" if stopped else "length"
                finished.append(s)
            elif line_end:
                lines.append((s, length))
        if lines:  # every line read back in one go, not one read per slot
            flat = torch.cat([self.table.tokens[s.index, s.line_start:n] for s, n in lines]).tolist()
            starts = [0, *itertools.accumulate(n - s.line_start for s, n in lines)]
            finished += [s for (s, n), a, b in zip(lines, starts, starts[1:]) if self._read_line(s, n, flat[a:b])]
        return finished

    def _read_line(self, s: _Slot, length: int, ids: list[int]) -> bool:
        """Feed the slot's scanner the line it just ended, ``ids`` (its tokens line_start..length-1); on a tool call,
        submit the code and pause the slot. True if it must finish instead ('output' trigger, budget spent)."""
        s.line_start = length
        code = s.scanner.feed(b"".join(map(self.tokenizer.token_bytes, ids)))
        if code is None:
            return False
        s.n_tokens, s.n_cached = length, length - 1  # the last drawn token is fed with the observation
        self.decoding.pop(s.index)
        self._rows = None
        if len(s.tool_calls) >= s.request.max_tool_calls:
            s.finish_reason = "tool_budget"
            return True
        s.code, s.future = code, submit(self.sandbox, code)
        return False

    def _scanner(self, s: _Slot) -> Scanner | None:
        """A scanner for the slot's next stretch of policy text, or None when no call can fire there: no sandbox,
        or the tool budget spent with trigger 'fence' or compat 'torl' (further calls are text; ToRL's last round
        has no stop string). With trigger 'output' and no compat a spent budget still watches for the trigger,
        which then ends the response ('tool_budget')."""
        spent = len(s.tool_calls) >= s.request.max_tool_calls
        if self.sandbox is None or (spent and (self.trigger == "fence" or self.compat == "torl")):
            return None
        return Scanner(self.trigger)

    def _collect_tool_results(self, block: bool) -> list[_Slot]:
        """Turn finished sandbox runs into observation tokens on their slots (waiting for one if ``block``);
        return the slots that the observation left without room to go on."""
        pending = [s for s in self.active.values() if s.waiting]
        if not pending:
            return []
        if block:
            t0 = time.perf_counter()
            wait([s.future for s in pending], return_when=FIRST_COMPLETED)
            self.stats["tool_wait_s"] += time.perf_counter() - t0
        done = [(s, finished_call(s.future, s.code, self.compat)) for s in pending if s.future.done()]
        return [s for s, call in done if self._insert_observation(s, call, self.tokenizer.encode(
            observation_block(self._last_text(s), call.observation, self.trigger, self.compat)))]

    def _last_text(self, s: _Slot) -> str:
        """The last few response tokens of the slot, decoded (what the observation must follow)."""
        return self.tokenizer.decode(self.table.tokens[s.index, max(len(s.request.prompt_ids), s.n_tokens - 8):
                                                       s.n_tokens].tolist())

    def _insert_observation(self, s: _Slot, call: ToolCall, ids: list[int]) -> bool:
        """Append the observation ``ids`` (mask 0) to the slot; its uncached tokens, the token sampled before the
        pause and the observation, are prefilled by the next step. True if no room is left to go on."""
        s.future = None
        s.tool_calls.append(call)
        ids = ids[:s.limit - s.n_tokens]
        self.table.write(s.index, s.n_tokens, ids)
        s.tool_spans.append((s.n_tokens, s.n_tokens + len(ids)))
        s.n_tokens += len(ids)
        s.line_start = s.n_tokens
        s.scanner = self._scanner(s)
        self.table.watch[s.index] = s.scanner is not None
        if s.n_tokens >= s.limit:
            s.finish_reason = "length"
            return True
        self._schedule(s)
        return False

    def _completion(self, s: _Slot) -> Completion:
        """The slot's result, read from the table: the response's ids and log-probs, its loss mask from the
        observations' places."""
        prompt = s.request.prompt_ids
        ids, logprobs = self.table.read(s.index, len(prompt), s.n_tokens)
        mask = [1] * len(ids)
        for start, end in s.tool_spans:
            mask[start - len(prompt):end - len(prompt)] = [0] * (end - start)
        return Completion(list(prompt), ids, mask, logprobs, s.tool_calls, s.finish_reason, s.prefill_tokens)
