"""Qwen2 / Qwen2.5 and Qwen3 (dense) written from scratch in plain PyTorch: one model, two switches.

One forward serves every use:
  * training: full sequences ``[B, T]``, padded or packed; ``seq_ids [B, T]`` says which sequence each token
    belongs to (attention stays inside a sequence, causal: :mod:`nanotorl.attention` picks the kernel that does it
    without a T x T mask where it can), ``positions`` restart at 0 for every sequence;
  * generation: new tokens of some cache slots are written into a preallocated :class:`KVCache` at their
    positions and attend to everything their slot holds, so the generator can pause and resume any slot.
    Several groups of rows (e.g. one token for each decoding slot and a chunk for each prefilling one) can
    share one forward: their tokens go through every layer together, only attention runs group by group.

The model returns final hidden states ``h [B, T, D]``; :meth:`Qwen2.logits` applies the LM head. The trainer
never needs the ``[N, V]`` logits (the fused log-prob kernel takes ``h`` and the head weight), the generator
only needs them for the last token of each row.

The embedding may have more rows than the tokenizer has tokens (Qwen2.5: 151,936 rows, 151,665 tokens; the rest
pad the matrix). :attr:`Qwen2.vocab`, set at load to the tokenizer's size (``checkpoint.load_model(vocab=...)``),
cuts the head to the ids the tokenizer has: an id past it gets no logit, which is the same as a logit of -inf.
The generator's sampler and the trainer's log-prob both read :attr:`Qwen2.head_weight`, so both see the same
distribution over the real tokens and their log-probs still agree.

Block (pre-norm):  x = x + o_proj(attn(rope(q), rope(k), v))  with q, k, v = q/k/v_proj(rms(x)) per head;
                   x = x + down(silu(gate(rms(x))) * up(rms(x))).
Qwen2 biases the q/k/v projections (``qkv_bias``); Qwen3 drops those biases and normalises each head of q and k
before RoPE (``qk_norm``: q = rope(rms_q(q_h)), k = rope(rms_k(k_h)), one weight [d] shared by all heads), and
sets ``head_dim`` itself (Qwen3-0.6B: 16 heads of 128 = 2048 wide from a hidden size of 1024).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanotorl.kernels import use_triton
from nanotorl.kernels.decode_attention import decode_attention
from nanotorl.kernels.logprob import logprob
from nanotorl.attention import Packing, attend, pack, sdpa, sdpa_heads, sequence_positions


@dataclass
class Qwen2Config:
    """Hyper-parameters of a Qwen2 or Qwen3 dense model; field names follow Hugging Face's ``config.json``, but for
    the two switches of the architecture (:mod:`nanotorl.checkpoint` maps ``model_type`` to them)."""
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    max_position_embeddings: int = 131072
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    head_dim: int | None = None     # None: hidden_size // num_attention_heads (Qwen2); Qwen3 sets it
    qkv_bias: bool = True           # Qwen2: biased q/k/v projections; Qwen3: none
    qk_norm: bool = False           # Qwen3: RMSNorm on each head of q and k before RoPE

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}: set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


class KVCache(nn.Module):
    """Keys and values of every layer for a fixed number of slots, preallocated at full length.

    k, v: [layers, slots, Hkv, max_len, d]. A slot holds one sequence; position p of that sequence lives at
    index p of each of its heads, so the positions 0..S-1 of a head are one block, as attention reads them (the
    decode kernel takes any strides). Nothing else is stored: which slot is live and how long it is belongs to
    the generator.
    """

    def __init__(self, cfg: Qwen2Config, slots: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store one layer's new keys and values k, v [N, Hkv, d] at ``rows`` [N * Hkv], indices into the cache's
        (slot, head, position) triples flattened ((slot * Hkv + head) * max_len + position), token-major."""
        for cache, new in ((self.k[layer], k), (self.v[layer], v)):
            cache.view(-1, new.shape[-1]).index_copy_(0, rows, new.flatten(0, 1).to(cache.dtype))

    def last_position(self, positions) -> int:
        """The largest of ``positions``, read on the host; a ValueError if the cache cannot hold it."""
        last = int(positions.max())
        if last >= self.max_len:
            raise ValueError(f"position {last} does not fit a cache of length {self.max_len}")
        return last

    def copy_positions(self, src: int, dst: int, start: int, end: int):
        """Positions start..end-1 of slot ``src`` copied into slot ``dst``, in every layer."""
        self.k[:, dst, :, start:end] = self.k[:, src, :, start:end]
        self.v[:, dst, :, start:end] = self.v[:, src, :, start:end]

    def window(self, slots, positions) -> "CacheWindow":
        """What every layer of one cached forward reads, worked out once for all layers.

        A one-token step on the Triton path leaves everything to the decode kernel (it reads each slot's
        length from ``positions``): no host sync, so the step can be captured in a CUDA graph; the caller keeps
        positions inside the cache (the generator does). Rows of several tokens (prefill chunks, slots resuming
        after a tool call) read their slots where they lie, a run of evenly spaced slots at a time (:func:`runs`)."""
        heads = torch.arange(self.k.shape[2], device=slots.device)
        flat = (slots[:, None, None] * len(heads) + heads) * self.max_len + positions[:, :, None]  # [B, T, Hkv]
        flat = flat.flatten()  # where the new keys and values go
        if positions.shape[1] == 1 and use_triton(positions):
            return CacheWindow(self, slots, positions, flat, None, 0, None)
        S = self.last_position(positions) + 1
        mask = torch.arange(S, device=positions.device) <= positions[:, None, :, None]  # [B, 1, T, S]
        bias = torch.zeros(mask.shape, device=positions.device, dtype=self.k.dtype).masked_fill_(~mask, -math.inf)
        if positions.shape[1] > 1:  # SDPA takes the additive bias as it is (a boolean mask it converts every call)
            return CacheWindow(self, slots, positions, flat, None, S, None, runs(slots, positions, bias))
        lo, B = int(slots[0]), len(slots)
        consecutive = torch.equal(slots, torch.arange(lo, lo + B, device=slots.device))
        bias = bias.expand(B, self.k.shape[2], 1, S).flatten(0, 1)  # [B * Hkv, 1, S]
        return CacheWindow(self, slots, positions, flat, slice(lo, lo + B) if consecutive else slots, S, bias)


@dataclass
class Run:
    """Rows ``rows`` of a cached forward whose slots step evenly through the cache (``slots``, a slice with a step):
    attention reads their keys and values ``k[slots, :, :S]`` as one strided view of the cache, never a copy, with
    ``mask [b, 1, T, S]``, an additive bias (S: one past the run's last position, so a short prefix is not read to
    the group's longest)."""
    rows: slice
    slots: slice
    mask: torch.Tensor


def runs(slots, positions, mask) -> list[Run]:
    """The rows of ``slots [B]`` at ``positions [B, T]`` cut into runs, rows in their order, each with its part of
    ``mask [B, 1, T, S_max]``: a run's slots go up by one step (any two slots do). The samples of one prompt sit
    in consecutive slots and resume together after a tool call; the prompts that a group prefills sit one group
    apart: one run each."""
    index, ends = slots.tolist(), (positions.amax(1) + 1).tolist()
    starts, steps = [0], [1]  # each run's first row and its step
    for b in range(1, len(index)):
        gap, first = index[b] - index[b - 1], b - starts[-1] == 1
        if first and gap > 0:  # a run's second row sets its step
            steps[-1] = gap
        elif first or gap != steps[-1]:
            starts.append(b)
            steps.append(1)
    return [Run(slice(a, b), slice(index[a], index[b - 1] + 1, step), mask[a:b, ..., :max(ends[a:b])])
            for a, b, step in zip(starts, starts[1:] + [len(index)], steps)]


@dataclass
class CacheWindow:
    """One cached forward: rows ``slots [B]`` of the cache get new tokens at ``positions [B, T]``, which ``flat``
    [B * T * Hkv] indexes in the cache flattened over (slot, head, position) (:meth:`KVCache.write`).
    With one token per row, ``rows`` selects those cache rows (a slice when they are consecutive, so reading them
    is a view, not a copy; None when the decode kernel reads the cache itself) and ``mask`` [B * Hkv, 1, S] is
    an additive bias: 0 on the slot's positions 0..p, -inf past p. With several, ``runs`` (:class:`Run`) say
    where each row's prefix lies, and hold the bias [b, 1, T, S] of their rows; S = max position + 1."""
    cache: KVCache
    slots: torch.Tensor
    positions: torch.Tensor
    flat: torch.Tensor
    rows: slice | torch.Tensor | None
    S: int
    mask: torch.Tensor | None
    runs: list[Run] | None = None


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 and cast back before the weight (as HF does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, dtype):
    """cos and signed sin [B, T, 1, d] of the rotary embedding at ``positions [B, T]``, once per forward.

    The angle a_i of pair (i, i + d/2) at position p is p * theta^(-2i/d); computed in fp32 and cast to the
    activations' dtype, exactly as Hugging Face's Qwen2 does. cos = [cos a, cos a], sin = [-sin a, sin a]: the
    sign of "rotate half" is in the table, so :func:`rope` needs no negation.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None, None] * inv_freq  # [B, T, 1, d/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def rope(x, rot):
    """Rotary embedding, "rotate half" convention: x * cos + [-x2, x1] * sin with x = [x1, x2] halves, written as
    x * cos + [x2, x1] * [-sin, sin] (the same products, bit for bit). x: [B, T, H, d]; rot from :func:`rope_tables`."""
    cos, signed_sin = rot
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: each head of q and k normalised over its d dimensions
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, rot, packing: Packing | None = None, windows: list[CacheWindow] | None = None):
        """x: [B, T, D] (training), or [N, D], the tokens of every group of a cached forward in a row."""
        rows = x.shape[:-1]
        q = rope(self.q_norm(self.q_proj(x).view(*rows, self.n_heads, self.head_dim)), rot)  # [..., Hq, d]
        k = rope(self.k_norm(self.k_proj(x).view(*rows, self.n_kv, self.head_dim)), rot)    # [..., Hkv, d]
        v = self.v_proj(x).view(*rows, self.n_kv, self.head_dim)
        if windows is None:
            out = sdpa(q, k, v) if packing is None else attend(q, k, v, packing)
        elif len(windows) == 1:
            out = self._attend_cached(q, k, v, windows[0])
        else:  # attention group by group
            sizes = [w.positions.numel() for w in windows]
            out = torch.cat([self._attend_cached(*part, w)
                             for *part, w in zip(q.split(sizes), k.split(sizes), v.split(sizes), windows)])
        return self.o_proj(out.flatten(-2))

    def _attend_cached(self, q, k, v, w: CacheWindow):
        """Write the new k, v [B * T, Hkv, d] of one group into its slots at its positions, then let each query
        q [B * T, Hq, d] attend to its slot's prefix; returns [B * T, Hq, d]."""
        w.cache.write(self.layer, w.flat, k, v)
        k_cache, v_cache = w.cache.k[self.layer], w.cache.v[self.layer]  # [slots, Hkv, S_max, d]
        B, T = w.positions.shape
        Hq, d = q.shape[1:]
        if w.runs is not None:  # each run attends to its prefix where it lies in the cache: a view, no copy
            q = q.view(B, T, Hq, d).transpose(1, 2)  # [B, Hq, T, d]
            out = [sdpa_heads(q[r.rows], *(c[r.slots, :, :r.mask.shape[-1]].to(q.dtype) for c in (k_cache, v_cache)),
                              r.mask) for r in w.runs]  # [b, Hq, T, d] each
            return (out[0] if len(out) == 1 else torch.cat(out)).transpose(1, 2).reshape(B * T, Hq, d)
        if w.rows is None:  # decode on GPU: the Triton flash-decoding kernel, which reads [slots, S_max, Hkv, d]
            out = decode_attention(q.to(k_cache.dtype), k_cache.transpose(1, 2), v_cache.transpose(1, 2), w.slots,
                                   w.positions[:, 0] + 1)
            return out.to(q.dtype)
        # one token per row: its G = Hq / Hkv query heads are G query rows of their KV head, and softmax(q k^T /
        # sqrt(d) + bias) v of each (row, KV head) is one small product: [B * Hkv] of them in one batched matmul
        # (on CPU about twice as fast as SDPA's kernel, which works head by head)
        keys, values = (c[w.rows, :, :w.S].to(q.dtype) for c in (k_cache, v_cache))  # [B, Hkv, S, d]
        scores = torch.baddbmm(w.mask, q.view(B * self.n_kv, Hq // self.n_kv, d), keys.flatten(0, 1).mT,
                               alpha=d ** -0.5)  # [B * Hkv, G, S]
        return torch.bmm(scores.float().softmax(-1).to(values.dtype), values.flatten(0, 1)).view(B, Hq, d)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rot, packing: Packing | None = None, windows: list[CacheWindow] | None = None):
        x = x + self.self_attn(self.input_layernorm(x), rot, packing, windows)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2(nn.Module):
    """The decoder. Parameter names are Hugging Face's ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` names without the
    ``model.`` prefix (``lm_head.weight`` keeps its name); :mod:`nanotorl.checkpoint` maps between the two."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.vocab = cfg.vocab_size  # ids 0..vocab-1 have a logit: the tokenizer's ids (set at load), module docstring

    @property
    def head_weight(self) -> torch.Tensor:
        """LM-head weight [vocab, D] (the embedding matrix when tied): the rows of the ids that can be produced."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return weight[:self.vocab]

    def logits(self, h):
        """h: [..., D] -> logits [..., vocab]."""
        return h @ self.head_weight.T

    def forward(self, input_ids, positions=None, seq_ids=None, cache: KVCache | None = None, slots=None):
        """input_ids: [B, T] -> final hidden states [B, T, D].

        Training: ``positions`` default to 0..T-1 and attention is plainly causal; with ``seq_ids [B, T]`` several
        sequences share a row (packing) or pads (any id of their own, e.g. -1) are kept apart, and ``positions``,
        if not given, count from 0 within each sequence.
        Generation: ``cache`` and ``slots [B]`` (the cache row of each batch row); ``positions [B, T]`` are where
        the new tokens go in their slot. They attend to slot positions 0..p, so earlier tokens must be there.
        Lists of ``input_ids``, ``positions`` and ``slots`` (one entry per group of rows, shapes as above) run the
        groups in one forward and return a list of hidden states, one [B_i, T_i, D] per group.
        """
        groups = isinstance(input_ids, (list, tuple))
        windows = None
        if cache is not None:
            if slots is None or positions is None:
                raise ValueError("a cached forward needs `positions` [B, T] and `slots` [B] (each row's cache row)")
            if not groups:
                input_ids, positions, slots = [input_ids], [positions], [slots]
            windows = [cache.window(s, p) for s, p in zip(slots, positions, strict=True)]
            input_ids = torch.cat([ids.flatten() for ids in input_ids])  # [N]: every group's tokens in a row
            positions = torch.cat([p.flatten() for p in positions])
        elif positions is None:
            positions = self._default_positions(input_ids, seq_ids)
        x = self.embed_tokens(input_ids)
        rot = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        packing = pack(seq_ids, x.dtype) if seq_ids is not None and windows is None else None
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, rot, packing, windows, use_reentrant=False)
            else:
                x = layer(x, rot, packing, windows)
        h = self.norm(x)
        if windows is None:
            return h
        sizes = [w.positions.numel() for w in windows]
        out = [part.view(*w.positions.shape, -1) for part, w in zip(h.split(sizes), windows)]
        return out if groups else out[0]

    def token_logprobs(self, input_ids, targets, positions=None, seq_ids=None, temperature: float = 1.0,
                       return_entropy: bool = False):
        """log p(targets[b, t] | input_ids[b, :t+1]) for every token, flattened to [B * T] fp32 (and the entropy
        of each next-token distribution), through the fused log-prob: the [B*T, V] logits are never
        materialised. ``targets`` of -100 are ignored (log-prob 0, no gradient)."""
        h = self.forward(input_ids, positions, seq_ids)  # [B, T, D]
        return logprob(h.flatten(0, 1), self.head_weight, targets.flatten(), temperature=temperature,
                       return_entropy=return_entropy)

    @staticmethod
    def _default_positions(input_ids, seq_ids):
        """positions [B, T]: 0..T-1, or with ``seq_ids`` the number of earlier tokens of the same sequence in the
        row."""
        B, T = input_ids.shape
        if seq_ids is None:
            return torch.arange(T, device=input_ids.device).expand(B, T)
        return sequence_positions(seq_ids)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        """Random initialisation for models trained from scratch (the demo): normal(0, std) weights,
        zero biases, unit norms (q/k norms included); output projections scaled by 1/sqrt(2 * layers) as in GPT-2."""
        scaled = ("o_proj.weight", "down_proj.weight")
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    s = std / math.sqrt(2 * self.cfg.num_hidden_layers) if name.endswith(scaled) else std
                    p.normal_(0.0, s, generator=generator)
        return self
