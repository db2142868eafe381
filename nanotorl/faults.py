"""What a cluster does to a training run, and how train.py survives it: a signal, a second writer, a torn log, a
diverging step. (A full disk while saving is :mod:`nanotorl.training_checkpoint`'s.)

* :class:`Preemption`: SIGTERM (a scheduler) or SIGINT (Ctrl-C) only sets a flag; at each safe point (before a
  step's rollout, and between its rollout and its update) every rank learns through one all-reduce whether any
  rank was signalled, so a signal to one rank stops them all at the same step. A second signal, more than
  :data:`DUPLICATE_S` after the first, ends the process at once (signals closer together are one request: a
  terminal and SLURM signal every process of the job, and torchrun forwards the same signal again).
* :func:`lock_out_dir`: rank 0 holds an ``flock`` on ``<out_dir>/lock`` while the job runs, with its host, pid and
  job written in the file; every rank learns the outcome by a broadcast. The kernel drops the lock with the
  process, so a killed job never blocks the next start.
* :func:`kept_log_lines`: metrics.jsonl read back on resume; a torn last line (a crash or a full disk mid-append)
  is dropped with one line, a torn line elsewhere is an error naming the file and line.
* :class:`Divergence`: counts the steps skipped for a non-finite loss or gradient norm and stops the run after
  ``--max-skipped-steps`` of them in a row; :func:`nonfinite` finds the tensors a checkpoint must not hold.
"""
import fcntl
import json
import os
import shlex
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from nanotorl import dist
from nanotorl.cli import Stop

DUPLICATE_S = 2.0  # a signal this soon after the first is the same request (forwarded by torchrun, or group-wide)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    """Install with ``with Preemption() as stop:``; ``stop.requested(device)`` at a safe point (every rank calls it)
    returns the signal any rank got (``signal.Signals``) or None. The previous handlers come back on exit."""

    def __init__(self):
        self.signum, self.first = 0, 0.0
        self.previous = {}

    def __enter__(self) -> "Preemption":
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if not self.signum:
            self.signum, self.first = signum, time.monotonic()
        elif time.monotonic() - self.first > DUPLICATE_S:  # the second request: stop now, as without a handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested(self, device) -> signal.Signals | None:
        """The signal any rank received so far (the largest number if several), agreed by all ranks."""
        signum = int(dist.all_max(float(self.signum), device))
        return signal.Signals(signum) if signum else None


def stopped(signum: signal.Signals, step: int, steps: int, ckpt, argv: list[str], rank: int, world: int) -> Stop:
    """The :class:`Stop` that ends a run stopped by ``signum`` after ``step`` of ``steps`` steps (checkpoint
    ``ckpt``): one line on rank 0 with the command that resumes, and the shell's status for that signal."""
    if rank:
        return Stop("", status=128 + signum)
    command = shlex.join(["train.py", *argv])
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = f"--nnodes={world // local} " if world > local else ""
        command = f"torchrun {nodes}--nproc_per_node={local} {command}"
    else:
        command = f"python {command}"
    kept = f"checkpoint {ckpt}" if ckpt else "no checkpoint (no step was completed)"
    return Stop(f"{signum.name} after step {step} of {steps}: {kept}; resume with the same command: {command}",
                status=128 + signum, prefix="stopped")


# ------------------------------------------------------------------------------------------ the out-dir lock


@contextmanager
def lock_out_dir(out_dir, rank: int):
    """``out_dir`` locked for this job for the duration (rank 0 holds the lock). A second job is refused on every
    rank: one line on rank 0 naming the holder, exit status 2."""
    held, refusal = None, ""
    if rank == 0:
        path = Path(out_dir) / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        held = open(path, "a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            holder = held.read().strip() or "a process that wrote nothing yet"
            held.close()
            held, refusal = None, (f"{out_dir} is in use by another run ({holder}; lock file {path}): wait for it to "
                                   f"end, or choose another --out-dir")
        else:
            held.truncate(0)
            job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "-"
            held.write(f"host {socket.gethostname()}, pid {os.getpid()}, job {job}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            held.flush()
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise Stop(refusal if rank == 0 else "", status=2)
    try:
        yield
    finally:
        if held is not None:
            held.close()  # closing the file drops the lock


# ------------------------------------------------------------------------------------------ metrics.jsonl


def kept_log_lines(file: Path, start: int, log=print) -> list[str]:
    """The lines of ``file`` (metrics.jsonl) of steps up to ``start`` (none when 0); a torn last line is dropped (with
    one line to ``log``), a torn line elsewhere raises a ValueError naming the file and the line."""
    lines = file.read_bytes().decode("utf-8", errors="replace").splitlines()
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                log(f"{file}:{n}: dropped a torn last line ({len(line)} characters: {e.msg}), left by a run that "
                    f"stopped while writing it")
                break
            raise ValueError(f"{file}:{n}: not valid JSON ({e.msg}); a log line is torn before the last one: delete "
                             f"that line, then run the same command again") from None
        if start and record["step"] <= start:  # a run without a checkpoint starts its log afresh
            keep.append(line)
    return keep


# ------------------------------------------------------------------------------------------ divergence


class Divergence:
    """Steps skipped for a non-finite loss or gradient norm (train.train_step's ``skipped``): ``skipped`` in all,
    ``in_a_row`` the current streak; :meth:`check` stops the run when the streak reaches ``limit``
    (``--max-skipped-steps``; 0 never stops)."""

    def __init__(self, limit: int, rank: int):
        self.limit, self.rank, self.skipped, self.in_a_row = limit, rank, 0, 0

    def count(self, record: dict) -> dict:
        """Count the step of ``record``; the counter for its record."""
        self.skipped += record["skipped"]
        self.in_a_row = self.in_a_row + 1 if record["skipped"] else 0
        return {"skipped_steps": self.skipped}

    def check(self, step: int, record: dict, ckpt) -> None:
        """Stop the run (:class:`Stop`) after ``step`` when it ends a streak of ``limit`` skipped steps."""
        if self.limit < 1 or self.in_a_row < self.limit:
            return
        if self.rank:
            raise Stop("")  # rank 0 says it
        kept = f"the last checkpoint, {ckpt}, holds finite weights" if ckpt else "no checkpoint was written"
        raise Stop(f"step {step}: the loss or the gradient norm was not finite on {self.in_a_row} steps in a row "
                   f"(loss {record['loss']:.4g}, grad norm {record['grad_norm']:.4g}; --max-skipped-steps "
                   f"{self.limit}), so those updates were skipped and the run stopped; {kept}. Start a new "
                   f"--out-dir from it (--model) with a lower --lr or --grad-clip")


def nonfinite_state(model, optimizer) -> dict[str, int]:
    """{name: number of NaN or infinite values} of the model's parameters and the optimizer's state that hold any,
    added up over the ranks (every rank calls it): each rank counts in its own shards, where they are."""
    names = {p: name for name, p in model.named_parameters()}
    local = {name: _local(p) for p, name in names.items()} | {
        f"optimizer.{names[p]}.{key}": _local(value) for p, state in optimizer.state.items()
        for key, value in state.items() if isinstance(value, torch.Tensor)}
    return dist.all_counts(nonfinite(local))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (a DTensor under FSDP2), or ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t.detach()


def nonfinite(tensors: dict) -> dict[str, int]:
    """{name: number of NaN or infinite values} of the floating-point tensors of ``tensors`` (nested dicts and
    lists, e.g. an optimizer state, are searched too) that hold any."""
    found = {}
    for key, value in tensors.items() if isinstance(tensors, dict) else enumerate(tensors):
        if isinstance(value, (dict, list, tuple)):
            found |= {f"{key}.{k}": n for k, n in nonfinite(value).items()}
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            if n := int((~torch.isfinite(value)).sum()):
                found[str(key)] = n
    return found
