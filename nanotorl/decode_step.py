"""The generator's decoding step for every cache slot at once, with fixed shapes, as one CUDA graph.

A CUDA graph replays a recorded sequence of kernel launches with one call, which removes the per-kernel
launch and Python overhead that dominates decoding a small batch (hundreds of launches per token). It needs
fixed shapes, fixed addresses and no host synchronisation inside: so the step always covers every slot of the
cache (a slot that is not decoding feeds a filler token and its draw is dropped), reads token ids and
positions from device buffers, keeps each slot's sampling parameters in device tensors, and runs the Triton
decode-attention and sampling kernels, which take per-slot lengths and parameters from device memory.

Why not ``torch.compile``: compiled (torch 2.13, inductor, on CPU), the in-place writes into the KV cache
became a copy of the whole cache per step, so a step's time grows with the cache length; ``python -m
bench.decode_step`` measures eager, captured and compiled steps side by side. On a CPU, a forward that writes
nothing compiles well: nanotorl/compiled_decode.py.
"""
import torch

from nanotorl.kernels import use_triton
from nanotorl.kernels.sampling import sample
from nanotorl.dist import hooks_bypassed
from nanotorl.model import KVCache
from nanotorl.slots import sampling_tensors, set_sampling


_CAPTURE_FAILURES = [  # (words of the CUDA error, what they mean and what to do)
    (("not joined", "unjoined"), "a side stream that waited on the capturing stream was never joined back: FSDP2's "
     "forward hooks do this, which is why the step calls the model through dist.hooks_bypassed (run it inside "
     "dist.gathered(model)); the capturing stream must wait on any other side stream before the capture ends"),
    (("not permitted when stream is capturing", "captureunsupported", "during cuda graph capture"),
     "something in the step synchronised with the host or copied from pageable host memory (.item(), .tolist(), "
     "nonzero, boolean-mask indexing, a data-dependent shape, torch.tensor(...)); tests/test_capturable.py runs "
     "the step on CPU under a mode that names such operations"),
    (("invalidated",), "an earlier operation of the capture failed (see the first error above)"),
]

CUDA_GRAPH = ("auto", "true", "false")  # --cuda-graph: auto decodes through a CUDA graph on CUDA, eagerly elsewhere


def use_cuda_graph(choice: str, device) -> bool:
    """Whether ``--cuda-graph`` ``choice`` (one of :data:`CUDA_GRAPH`) captures the decode step on ``device``. A
    capture that fails decodes eagerly with a warning that names why (nanotorl.generate)."""
    if choice not in CUDA_GRAPH:
        raise ValueError(f"--cuda-graph must be one of {list(CUDA_GRAPH)}, got {choice!r}")
    return choice == "true" or (choice == "auto" and torch.device(device).type == "cuda")


def capture_hint(message: str) -> str:
    """What a failed capture's CUDA error ``message`` means, and what to do."""
    text = message.lower()
    for words, hint in _CAPTURE_FAILURES:
        if any(w in text for w in words):
            return hint
    return ("the step must run on the device alone: no host syncs, no unjoined side streams, fixed shapes and "
            "addresses")


class DecodeStep:
    """One decoding step of every cache slot at once, with fixed shapes and no host sync: token ids and positions
    [N] in, each slot's next token and its log-prob out. A slot's sampling parameters live in device tensors, set
    when a request takes the slot; the draw at position p uses offset p + 1, as the plain path does.

    On CUDA the step is captured once as a CUDA graph and then replayed: one launch instead of hundreds of
    kernel launches per token. A graph reads the weights at the addresses it was captured with, so the
    generator captures one per ``generate`` call, during which they stay put (FSDP2 gathers the full weights
    into new memory for each rollout). Elsewhere (CPU, where the tests compare it with the plain path) the
    same step runs as it is."""

    def __init__(self, model, cache: KVCache, graph: bool | None = None, params: dict | None = None):
        """``graph``: capture a CUDA graph (default: on CUDA). ``params``: the per-slot sampling tensors to read
        (the generator passes its SlotTable's, so a slot's parameters live in one place); default: own ones, set
        with :meth:`set_request`."""
        N, dev = cache.k.shape[1], cache.k.device
        self.model, self.cache = model, cache
        self.inputs = torch.zeros(2, N, dtype=torch.int64, device=dev)  # token ids, positions
        self.slots = torch.arange(N, device=dev)
        self.params = sampling_tensors(N, dev) if params is None else params
        self.graph = self._capture() if (dev.type == "cuda" if graph is None else graph) else None

    def set_request(self, index: int, request):
        """Give slot ``index`` the sampling parameters and seed of ``request`` (a ``generate.Request``)."""
        set_sampling(self.params, index, request)

    def _run(self):
        """The step that is captured: every operation on the device, no host reads, no FSDP hooks."""
        ids, positions = self.inputs
        with hooks_bypassed(self.model):
            h = self.model(ids[:, None], positions=positions[:, None], cache=self.cache, slots=self.slots)  # [N, 1, D]
        logits = self.model.logits(h[:, 0]).float()
        p = self.params
        self.tokens, self.logprobs = sample(logits, p["temperature"], p["top_k"], p["top_p"], p["min_p"], p["seed"],
                                            positions + 1)

    def _capture(self):
        if not use_triton(self.inputs):
            raise RuntimeError("cuda_graph needs the Triton kernels (the PyTorch references synchronise with the "
                               "host): unset NANOTORL_KERNELS=torch or turn cuda_graph off")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the kernels and settle the allocator before capturing
            for _ in range(2):
                self._run()  # token 0 at position 0 of every slot: overwritten by each slot's first prefill
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._run()
        except RuntimeError as e:
            raise RuntimeError(f"capturing the decode step as a CUDA graph failed: {e}\n{capture_hint(str(e))}; "
                               "or run without cuda_graph") from e
        return graph

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and positions [N] of every slot -> the next token and its log-prob [N] of every slot."""
        self.inputs[0].copy_(ids)
        self.inputs[1].copy_(positions)
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run()
        return self.tokens, self.logprobs
