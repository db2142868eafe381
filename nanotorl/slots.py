"""Every cache slot's sequence on the device: its tokens, their log-probs, its length, its sampling parameters.

The generator's step touches these tensors for all the rows of a step at once: one gather gives the decoding rows
their inputs, one scatter appends the drawn tokens, and one test over the drawn tokens finds the slots the host
must look at (an end id, a full slot, a line end that a fence scanner waits for). So the host's work per step grows
with what happens (a sequence ends, a line ends, a tool is called), not with the number of slots, and nothing is
read back per slot. Token in, token out: ``tokens`` holds the ids a slot was given and sampled, unchanged.
"""
import torch


def sampling_tensors(slots: int, device) -> dict[str, torch.Tensor]:
    """Per-slot sampling parameters [slots] each, on the device: temperature, top_k, top_p, min_p and seed."""
    return {"temperature": torch.ones(slots, device=device),
            "top_k": torch.zeros(slots, dtype=torch.int64, device=device),
            "top_p": torch.ones(slots, device=device), "min_p": torch.zeros(slots, device=device),
            "seed": torch.zeros(slots, dtype=torch.int64, device=device)}


def set_sampling(params: dict[str, torch.Tensor], i: int, request):
    """Slot ``i`` of ``params`` (:func:`sampling_tensors`) takes the sampling parameters and seed of ``request``
    (a ``generate.Request``)."""
    sp = request.sampling
    for name, value in (("temperature", sp.temperature), ("top_k", sp.top_k), ("top_p", sp.top_p),
                        ("min_p", sp.min_p), ("seed", request.seed)):
        params[name][i] = value


class SlotTable:
    """``tokens [N, L]`` and ``logprobs [N, L]`` (0 on prompt and tool tokens) of N slots of length L; ``length [N]``
    (tokens so far), ``limit [N]`` (the length at which a slot is full), ``watch [N]`` (its text is scanned for
    tool calls), per-slot sampling parameters (:attr:`params`), and per-token tables: ``stop [V]`` (an end id) and
    ``line_end [V]`` (the token's bytes hold a line end: only there can a call fire, :mod:`nanotorl.fences`)."""

    def __init__(self, slots: int, length: int, stop: torch.Tensor, line_end: torch.Tensor, device):
        self.tokens = torch.zeros(slots, length, dtype=torch.int64, device=device)
        self.logprobs = torch.zeros(slots, length, device=device)
        self.length = torch.zeros(slots, dtype=torch.int64, device=device)
        self.limit = torch.zeros(slots, dtype=torch.int64, device=device)
        self.watch = torch.zeros(slots, dtype=torch.bool, device=device)
        self.stop, self.line_end = stop.to(device), line_end.to(device)
        self.params = sampling_tensors(slots, device)

    def admit(self, i: int, request, limit: int, watch: bool):
        """Slot ``i`` takes ``request`` (a ``generate.Request``): its prompt, parameters and seed; full at ``limit``."""
        set_sampling(self.params, i, request)
        self.limit[i], self.watch[i] = limit, watch
        self.write(i, 0, request.prompt_ids)

    def write(self, i: int, start: int, ids: list[int]):
        """Tokens that were not sampled (a prompt, an observation) at ``start`` of slot ``i``, log-prob 0."""
        end = start + len(ids)
        self.tokens[i, start:end] = torch.tensor(ids, dtype=torch.int64)
        self.logprobs[i, start:end] = 0.0
        self.length[i] = end

    def read(self, i: int, start: int, end: int) -> tuple[list[int], list[float]]:
        """Token ids and log-probs of positions start..end-1 of slot ``i``."""
        return self.tokens[i, start:end].tolist(), self.logprobs[i, start:end].tolist()

    def decode_inputs(self, slots: torch.Tensor, decoding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, positions) [B] of a decoding forward over ``slots [B]``: a decoding slot (``decoding [B]``)
        feeds its last token at its position; any other slot feeds token 0 just past its tokens, where nothing is
        read before a real token is written (not even a chunk the same forward prefills there); its draw is
        dropped."""
        length = self.length[slots]
        last = self.tokens[slots, (length - 1).clamp(min=0)]
        return torch.where(decoding, last, 0), length - decoding.long()

    def sampling(self, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The sampler's per-row arguments for ``slots [R]`` whose tokens are all cached: temperature, top_k,
        top_p, min_p, seed and offset (the number of tokens so far, so each position draws its own noise)."""
        p = self.params
        return (p["temperature"][slots], p["top_k"][slots], p["top_p"][slots], p["min_p"][slots], p["seed"][slots],
                self.length[slots])

    def append(self, slots: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor):
        """Append one drawn token (and its log-prob) to each of ``slots [R]``; returns, read back in one go, the
        rows that need the host, as (row, stopped, full, line end, length) with the flags as 0/1."""
        at = self.length[slots]
        self.tokens[slots, at] = tokens
        self.logprobs[slots, at] = logprobs
        self.length[slots] = at + 1
        flags = torch.stack([self.stop[tokens], at + 1 >= self.limit[slots], self.line_end[tokens] & self.watch[slots]])
        rows = flags.any(0).nonzero()[:, 0]
        return torch.cat([rows[:, None], flags[:, rows].T.long(), (at + 1)[rows, None]], 1).tolist()
