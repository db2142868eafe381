"""Everything distributed, in one place, on PyTorch's own engine: torchrun, torch.distributed, FSDP2.

* :func:`setup` joins the process group torchrun describes (gloo on CPU, NCCL on GPU); a plain ``python`` run on
  CPU is a world of one with no process group, and on GPU a world of one over an in-memory store, so FSDP2 and
  its mixed precision serve single-GPU runs too.
* :func:`shard` applies FSDP2 (``fully_shard``) to every decoder block and then to the whole model.
* :func:`gathered` unshards every block for generation, so the same model that trains also generates (no second
  copy of the weights) and each rank can run as many decode steps as its own sequences need; inside it,
  :func:`hooks_bypassed` calls the model without FSDP2's forward hooks (for a CUDA-graph capture).
* Checkpoints: :func:`full_tensor` gathers one tensor at a time (the weights are streamed to a Hugging Face
  directory); :func:`save_optimizer` writes the optimizer's state through torch.distributed.checkpoint (DCP),
  every rank its own shards, and :func:`load_optimizer` reads it back on any number of ranks (DCP reshards);
  :func:`full_state_dict` and :func:`load_optimizer_state` serve tests and checkpoints of the older layout.
* :func:`shard_of` is a rank's share of a list (problems, samples); :func:`all_sum` and :func:`all_max` add up
  what the ranks measured.
* :func:`end_process` ends a process that was in a process group without the interpreter's finalisation.
"""
import atexit
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.distributed as dist

_joined = False  # this process joined a process group (setup), torn down or not


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, joining the process group if there is one."""
    global _joined
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        _joined = True
        return dist.get_rank(), dist.get_world_size(), device
    if cuda:
        if not dist.is_initialized():
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        _joined = True
        return 0, 1, torch.device("cuda", 0)
    return 0, 1, torch.device("cpu")


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def teardown():
    """Leave the process group together (a rank that leaves while another still talks can abort gloo)."""
    if distributed():
        dist.barrier()
        dist.destroy_process_group()


def end_process(status: int):
    """Exit with ``status``; a process that joined a process group runs its atexit hooks, flushes stdout and
    stderr, then leaves with ``os._exit``, without the interpreter's finalisation.

    Beside a CPU hog, 1 run in 22 of a 2-process gloo script aborted after its work was done, with "terminate
    called without an active exception"; faulthandler showed the main thread in finalisation, with no Python
    frame. PyTorch's gloo workers keep the tensors of their last collective until they go idle, and freeing one
    whose Python object had died needs the GIL: a C++ thread that touches Python while the interpreter finalises is
    unwound inside a destructor that may not throw. Skipping finalisation skips that phase (0 aborts in 45 runs)."""
    if not _joined:
        sys.exit(status)
    atexit._run_exitfuncs()  # what finalisation would run first (e.g. the reward verifier's workers are closed)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def shard(model, param_dtype: torch.dtype | None = None, cpu_offload: bool = False):
    """FSDP2 over ``model`` (each block, then the root) when a process group exists; a no-op otherwise.

    ``param_dtype`` sets FSDP2's mixed precision (compute in bf16, keep fp32 master weights and reduce in
    fp32). ``token_logprobs`` is registered as a forward method so the LM head is gathered for it too.
    """
    if not distributed():
        return model
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    kw = {}
    if param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.layers:
        fully_shard(block, reshard_after_forward=_reshards_after_forward(model, block), **kw)
    fully_shard(model, reshard_after_forward=_reshards_after_forward(model, model), **kw)
    register_fsdp_forward_method(model, "token_logprobs")
    return model


def _reshards_after_forward(root, module) -> bool:
    """FSDP2's setting for ``module`` (set by :func:`shard`, restored by :func:`gathered`): a block frees its
    gathered weights after its forward, the root (embedding, final norm, LM head) keeps them, since the backward
    needs them right after the forward (FSDP2's own default for the root)."""
    return module is not root


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model):
    """Every parameter unsharded for the duration (generation); resharded afterwards, with each module's own
    reshard-after-forward setting back."""
    modules = _fsdp_modules(model) if distributed() else []
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(_reshards_after_forward(model, m), recurse=False)


@contextmanager
def hooks_bypassed(model):
    """Calls of ``model`` (and of its blocks) skip FSDP2's forward hooks for the duration; only inside
    :func:`gathered`, where every parameter is whole and the hooks have nothing to do. A CUDA graph is captured
    this way: the root's pre-forward hook makes FSDP's all-gather streams wait on the capturing stream and never
    joins them back, so the capture could not end (cudaErrorStreamCaptureUnjoined)."""
    modules = _fsdp_modules(model) if distributed() else []
    if modules:
        from torch.distributed.tensor import DTensor
        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise RuntimeError("hooks_bypassed: the model's parameters are sharded; use it inside dist.gathered(model)")
    hooks = [(m, m._forward_pre_hooks, m._forward_hooks) for m in modules]
    for m in modules:  # nn.Module's own hook tables: empty ones make a call run just the module's forward
        m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield model
    finally:
        for m, pre, post in hooks:
            m._forward_pre_hooks, m._forward_hooks = pre, post


def full_state_dict(model) -> dict:
    """The whole model's state dict on CPU, on rank 0 (empty elsewhere)."""
    if not distributed():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of ``t`` on CPU: gathered over the ranks when it is a DTensor (then every rank calls it)."""
    if not hasattr(t, "full_tensor"):
        return t.detach().cpu()
    if t.device.type != t.device_mesh.device_type:  # a CPU-offloaded shard: NCCL gathers from the GPU
        from torch.distributed.tensor import DTensor
        t = DTensor.from_local(t.to_local().to(t.device_mesh.device_type), t.device_mesh, t.placements,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor().cpu()


def save_optimizer(model, optimizer, path) -> None:
    """The optimizer's state as a DCP checkpoint in directory ``path``: each rank writes its own shards (one
    ``__<rank>_0.distcp`` file each) and rank 0 the ``.metadata`` that says where every piece of every tensor is."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))


def load_optimizer(model, optimizer, path) -> None:
    """Read :func:`save_optimizer`'s checkpoint into ``optimizer``, whatever the number of ranks that wrote it:
    each rank reads just the pieces of its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the layout to fill (state made if empty)
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a full optimizer state read on rank 0 (others pass ``{}``) into the sharded optimizer."""
    if not distributed():
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def shard_of(items: list, rank: int, world: int, group: int = 1) -> tuple[list, int]:
    """This rank's contiguous share of ``items`` (in whole groups) and the index where it starts."""
    groups = len(items) // group
    lo, hi = groups * rank // world, groups * (rank + 1) // world
    return items[lo * group:hi * group], lo * group


def all_sum(values: dict, device) -> dict:
    """Sum each number of ``values`` over the ranks."""
    if not distributed():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_counts(counts: dict) -> dict:
    """Add up dicts of counts over the ranks, whose keys may differ from rank to rank (e.g. error kinds)."""
    if not distributed():
        return dict(counts)
    total = {}
    for part in all_objects(dict(counts)):
        for key, value in part.items():
            total[key] = total.get(key, 0) + value
    return total


def all_objects(obj) -> list:
    """``obj`` of every rank, in rank order (picklable objects)."""
    if not distributed():
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def gathered_lists(items: list) -> list:
    """Every rank's ``items`` (picklable), rank 0's first, concatenated on every rank."""
    return [item for part in all_objects(list(items)) for item in part]


def all_max(value: float, device) -> float:
    if not distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_object(obj, src: int = 0):
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if distributed():
        dist.barrier()
