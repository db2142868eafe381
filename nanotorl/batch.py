"""What one forward of the generator feeds: its groups of rows, built from the slot table.

A forward holds groups of rows that share every layer but attention (:meth:`nanotorl.model.Qwen2.forward`): the
prefill chunks, one row per prefilling slot, in groups of rows of about one length (:func:`prefill_groups`), and the
decoding tokens, one row per slot of the decoding span. The span runs from the first to the last decoding slot, so
attention reads their cache rows as a view; the slots in between that do not decode ride along as fillers
(:meth:`nanotorl.slots.SlotTable.decode_inputs`).
The decoding group's layout only changes when a slot starts or stops decoding, so it is built then
(:class:`DecodeRows`), not every step. The samples of one prompt prefill it once (:func:`twins`).
"""
from dataclasses import dataclass

import torch

from nanotorl.slots import SlotTable


@dataclass
class Group:
    """Rows of one forward, one per slot: its cache row (``slots [B]``), the token ids it feeds and their positions
    ``[B, T]``. ``ready``: the slots whose tokens the group caches to the last, with their indices ``ready_idx [R]``
    and the flat row (b * T + t) of that last token in ``last [R]``."""
    slots: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor
    ready: list
    ready_idx: torch.Tensor
    last: torch.Tensor


def prefill_groups(table: SlotTable, prefill: list, chunk: int) -> list[Group]:
    """The next chunk (at most ``chunk`` tokens) of every prefilling slot, read from the table, in groups of rows of
    about one length: a row is right-padded to its group's longest, so a prompt of 60 tokens beside an observation of
    6 would feed 54 pads through every layer. Longest first, a row joins the group before it if padding wastes at
    most a quarter of the group's length, else it starts the next group; a group's rows stay in slot order (slots
    that step evenly are read as one view, :func:`nanotorl.model.runs`)."""
    fed = {s.index: min(s.n_tokens - s.n_cached, chunk) for s in prefill}
    groups = []  # lists of slots, each group's longest first
    for s in sorted(prefill, key=lambda s: -fed[s.index]):
        if groups and 4 * fed[s.index] >= 3 * fed[groups[-1][0].index]:
            groups[-1].append(s)
        else:
            groups.append([s])
    groups = [sorted(g, key=lambda s: s.index) for g in groups]
    return [_prefill_group(table, g, [fed[s.index] for s in g]) for g in groups]


def _prefill_group(table: SlotTable, prefill: list, fed: list[int]) -> Group:
    """Rows ``prefill`` feeding ``fed`` tokens each, right-padded to the longest; the pads run past the slot's tokens
    (the cache has a prefill chunk of spare positions), where nothing reads before a real token overwrites them.
    Ready: the slots the chunk completes."""
    dev = table.length.device
    T = max(fed)
    slots = torch.tensor([s.index for s in prefill], device=dev)
    positions = torch.tensor([s.n_cached for s in prefill], device=dev)[:, None] + torch.arange(T, device=dev)
    ids = table.tokens[slots[:, None], positions.clamp(max=table.tokens.shape[1] - 1)]  # [B, T]
    done = [b for b, (s, n) in enumerate(zip(prefill, fed)) if s.n_cached + n == s.n_tokens]
    return Group(slots, ids, positions, [prefill[b] for b in done], slots[done],
                 torch.tensor([b * T + fed[b] - 1 for b in done], dtype=torch.int64, device=dev))


class DecodeRows:
    """The decoding group's layout for the decoding slots ``decode`` (in slot order): the span of slot indices
    (:func:`decode_span`), which rows of it decode, and the same over every slot (for the fixed-shape step)."""

    def __init__(self, decode: list, slots: int, device):
        self.slots = decode
        self.all_slots = torch.arange(slots, device=device)                                    # [N]
        self.idx = torch.tensor([s.index for s in decode], dtype=torch.int64, device=device)   # [R]
        self.all_decoding = torch.zeros(slots, dtype=torch.bool, device=device)               # [N]
        self.all_decoding[self.idx] = True
        span = decode_span([s.index for s in decode])
        self.span = torch.tensor(span, device=device)                                           # [B]
        self.decoding = self.all_decoding[self.span]                                            # [B]
        self.rows = self.decoding.nonzero()[:, 0]                                               # [R]

    def group(self, table: SlotTable) -> Group:
        ids, positions = table.decode_inputs(self.span, self.decoding)
        return Group(self.span, ids[:, None], positions[:, None], self.slots, self.idx, self.rows)


def decode_span(indices: list[int]) -> list[int]:
    """Slot indices of the decoding forward for decoding slots ``indices`` (ascending): all from the first to the
    last (consecutive cache rows are read as a view) when that at most doubles the rows, else only those."""
    lo, hi = indices[0], indices[-1]
    return list(range(lo, hi + 1)) if hi - lo + 1 <= 2 * len(indices) else indices


def twins(prefill: list, chunk: int) -> tuple[list, list[tuple]]:
    """(fed, twins): the prefilling slots to feed, in slot order, and (slot, twin) for every other one: a slot still
    on its prompt whose prompt up to the end of this chunk is that of an earlier slot that is fed, from the same
    start, and which the chunk completes if and only if it completes the twin, its twin (the G samples of one
    prompt). The twins' caches then hold the same keys and values, so the slot copies them, and the twin's last
    hidden state when the chunk completes them."""
    fed, pairs, first = [], [], {}
    for s in prefill:
        prompt, end = s.request.prompt_ids, s.n_cached + chunk
        key = (s.n_cached, tuple(prompt[:end]), len(prompt) <= end) if s.n_tokens == len(prompt) else s.index
        twin = first.setdefault(key, s)
        if twin is s:
            fed.append(s)
        else:
            pairs.append((s, twin))
    return fed, pairs
