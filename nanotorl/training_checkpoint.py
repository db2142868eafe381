"""Training checkpoints: what a run needs to go on from where it stopped, written so that a crash, a power loss or a
full disk never leaves a checkpoint that looks complete and is not.

``<out_dir>/checkpoints/step_N/`` is a Hugging Face directory (:func:`nanotorl.checkpoint.save_state_dict`: the
weights streamed one tensor at a time, config, tokenizer) plus ``optimizer/``, the optimizer's state as a
torch.distributed.checkpoint (DCP) directory that every rank writes its own shards into, ``trainer.json`` (step,
world size, the run's config) and one ``rng_rank<R>.pt`` per rank. Nothing but one weight tensor at a time is
gathered. It is written as ``step_N.tmp``, flushed to the disk (every file, then the directories) and renamed once
complete, so :func:`latest_checkpoint` never picks a torn one; :func:`resume` reads it back on any number of
processes (DCP reshards). A state with a non-finite value is never written, and a full disk stops the run with one
line (:class:`nanotorl.cli.Stop`) while the previous checkpoint stays as it was. A checkpoint of the older layout
(the whole optimizer in ``trainer.pt``) still resumes, on the number of processes that wrote it.
"""
import errno
import json
import os
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from nanotorl import dist, faults
from nanotorl.checkpoint import atomic_write, fsync, save_state_dict
from nanotorl.cli import Stop, read_json

TRAINER, OLD_TRAINER = "trainer.json", "trainer.pt"  # step, world, config (the old one: and the optimizer)


def latest_checkpoint(out_dir) -> Path | None:
    """The newest complete checkpoint (directories are renamed into place only once fully written)."""
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")
                  and ((p / TRAINER).is_file() or (p / OLD_TRAINER).is_file()))
    return done[-1] if done else None


def save_checkpoint(model, optimizer, tokenizer, out_dir, step: int, config: dict, keep: int, rank: int,
                    world: int) -> None:
    """Checkpoint ``step`` into ``<out_dir>/checkpoints`` (module docstring); only the newest ``keep`` stay. Every
    rank calls it and writes its own share. A non-finite state, or a disk without room, stops every rank
    (:class:`nanotorl.cli.Stop`, its line on rank 0) before anything is renamed into place."""
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if bad := faults.nonfinite_state(model, optimizer):
        raise Stop(_nonfinite_line(bad, final) if rank == 0 else "")
    if rank == 0:  # any step_*.tmp is a torn save (this step's, or one a killed run left: its space would be lost)
        for torn in root.glob("step_*.tmp"):  # the out dir is locked (faults.lock_out_dir): no other run writes here
            shutil.rmtree(torn, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    need = 3 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights and AdamW's two moments
    problem = _agreed(_disk_full(lambda: save_state_dict(model.state_dict(), model.cfg, tmp, rank=rank,
                                                         tokenizer_dir=tokenizer.path, eos_ids=tokenizer.eos_ids),
                                 tmp, need))
    if not problem:  # DCP raises on every rank when any rank's write failed
        problem = _agreed(_disk_full(lambda: _write_rank_state(model, optimizer, tmp, rank), tmp, need))
    if not problem and rank == 0:
        trainer = {"step": step, "world": world, "config": config}
        problem = _disk_full(lambda: atomic_write(tmp / TRAINER, lambda f: f.write_text(json.dumps(trainer))),
                             tmp, need)
        if not problem:
            fsync(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync(root)
            for old in sorted(p for p in root.glob("step_*") if not p.name.endswith(".tmp"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    problem = dist.broadcast_object(problem)
    if problem:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise Stop(problem if rank == 0 else "")


def _write_rank_state(model, optimizer, tmp: Path, rank: int) -> None:
    """This rank's optimizer shards (DCP) and RNG state, flushed to the disk."""
    dist.save_optimizer(model, optimizer, tmp / "optimizer")
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_rank{rank}.pt")
    for file in [tmp / f"rng_rank{rank}.pt", *(tmp / "optimizer").glob(f"__{rank}_*")]:
        fsync(file)
    if rank == 0:  # the coordinator wrote the metadata that says where every piece is
        fsync(tmp / "optimizer" / ".metadata")
        fsync(tmp / "optimizer")


def _disk_full(write, tmp: Path, need: int) -> str:
    """Run ``write``; "" when it worked, the line that says so when the disk (``tmp``'s) has no room for ``need``
    bytes; anything else is raised."""
    try:
        write()
        return ""
    except (Exception, CheckpointException) as e:  # torch.save says a full disk as a RuntimeError, DCP as its own
        free = shutil.disk_usage(tmp.parent).free
        if not _no_room(e) and free >= need:
            raise
    ckpt = latest_checkpoint(tmp.parent.parent)
    kept = f"the last checkpoint, {ckpt}, is intact" if ckpt else "no checkpoint was written yet"
    return (f"{tmp.parent}: no room for checkpoint {tmp.name.removesuffix('.tmp')} (it needs about {need / 2**20:,.1f} "
            f"MiB, {free / 2**20:,.1f} MiB are free); {kept}. Free some space, then run the same command to resume")


def _no_room(e: BaseException) -> bool:
    """Whether ``e`` says the disk is full: itself, what it was raised from, or (DCP's CheckpointException) what
    failed on any rank."""
    causes = [e, e.__cause__, e.__context__, *(exc for exc, _ in getattr(e, "failures", {}).values())]
    return any(getattr(c, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for c in causes if c is not None)


def _agreed(problem: str) -> str:
    """The first rank's problem, on every rank ("" when none had one): the ranks go on, or stop, together."""
    return next((p for p in dist.all_objects(problem) if p), "")


def _nonfinite_line(bad: dict[str, int], final: Path) -> str:
    """Why checkpoint ``final`` is not written: ``bad`` tensors hold NaN or infinite values (so many)."""
    where = ", ".join(f"{name} ({n})" for name, n in list(bad.items())[:3])
    ckpt = latest_checkpoint(final.parent.parent)
    kept = f"the last checkpoint, {ckpt}, is intact" if ckpt else "no checkpoint was written"
    return (f"{final.name}: {sum(bad.values())} non-finite values in {len(bad)} tensors (e.g. {where}), so it was not "
            f"written; {kept}. Start a new --out-dir from it (--model) with a lower --lr or --grad-clip")


def resume(model, optimizer, ckpt: Path, rank: int, world: int) -> int:
    """Load optimizer, RNG and step from ``ckpt`` (the weights were loaded from it already); return the step.
    Any number of processes resumes a checkpoint; one of the older layout (``trainer.pt``) needs the same number."""
    if not (ckpt / TRAINER).is_file():
        return _resume_trainer_pt(model, optimizer, ckpt, rank, world)
    step = read_json(ckpt / TRAINER)["step"]
    try:
        dist.load_optimizer(model, optimizer, ckpt / "optimizer")
    except (Exception, CheckpointException) as e:  # DCP raises what its reader raised, on every rank
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{ckpt / 'optimizer'}: cannot read the optimizer state ({type(e).__name__}: {why}); move "
                         f"{ckpt} away to resume from the checkpoint before it") from None
    _load_rng(ckpt, rank)
    return step


def _load_rng(ckpt: Path, rank: int) -> None:
    """This rank's RNG state, when the run that wrote ``ckpt`` had this rank."""
    rng = ckpt / f"rng_rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng)["torch"])


def _resume_trainer_pt(model, optimizer, ckpt: Path, rank: int, world: int) -> int:
    """Resume a checkpoint of the layout before 2026-12-06: the whole optimizer in ``trainer.pt``, read on rank 0."""
    try:
        state = torch.load(ckpt / OLD_TRAINER, weights_only=False)
    except Exception as e:  # torch.load raises what the unpickler or the zip reader raised
        raise ValueError(f"{ckpt / OLD_TRAINER}: cannot read the training state ({type(e).__name__}: {e}); move "
                         f"{ckpt} away to resume from the checkpoint before it") from None
    if state["world"] != world:
        raise ValueError(f"{ckpt} was written by {state['world']} process(es), this run has {world}: resume with "
                         f"--nproc_per_node={state['world']}, or start a new --out-dir from its weights (--model {ckpt})")
    dist.load_optimizer_state(model, optimizer, state["optimizer"] if rank == 0 else {})
    _load_rng(ckpt, rank)
    return state["step"]
