"""What a pool that died without closing leaves behind, and how the next pool removes it, safely.

A pool's working directory (``<tmp>/nanotorl-sandbox-<owner>-<random>``) goes when the pool closes, and each
server's pids cgroup (``<pids hierarchy>/<that directory's name>.<n>``) when the server ends. When the trainer is
SIGKILLed nothing runs to remove the directory, nor, in the mode without namespaces, the cgroups
(docs/sandbox.md). So both names carry their owner, the process that made the pool:

    <owner> = <pid namespace>-<pid>-<start time>

(the inode of ``/proc/self/ns/pid``, the pid, and the process's start time in clock ticks after boot, field 22 of
``/proc/<pid>/stat``), and every new pool first removes what a dead owner left (:func:`remove_dead`). Only that:

- a name that does not parse as ``nanotorl-sandbox-<owner>-...`` is left alone (pools before this scheme, other
  programs);
- so is an owner in another pid namespace (its pid means nothing here) and an entry that belongs to another uid;
- the owner is dead when no process with its pid has its start time (a reused pid starts later);
- removal is ``rmdir`` only: a directory that is not empty, or a cgroup that still holds a task, stays.

A live pool's names are never touched: its owner's pid and start time match.
"""
import os
import re
import tempfile

from nanotorl.sandbox import isolation

PREFIX = "nanotorl-sandbox-"
_OWNED = re.compile(re.escape(PREFIX) + r"(\d+)-(\d+)-(\d+)-")


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks after boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # fields from 3 (state) on; the command may hold spaces


def owner_prefix() -> str:
    """The name prefix of this process's pools: ``nanotorl-sandbox-<owner>-``."""
    return f"{PREFIX}{_pid_namespace()}-{os.getpid()}-{start_time(os.getpid())}-"


def dead_owner(name: str) -> bool:
    """Was ``name`` made by a pool whose owner, in this pid namespace, is gone?"""
    m = _OWNED.match(name)
    if m is None:
        return False
    namespace, pid, start = map(int, m.groups())
    return namespace == _pid_namespace() and start_time(pid) != start


def _remove_dead_in(parent: str | None, remove) -> list[str]:
    """``remove(path)`` (True if it went) for every entry of ``parent`` of ours whose owner is dead; what went."""
    if parent is None or not os.path.isdir(parent):
        return []
    gone = []
    for name in os.listdir(parent):
        if not _OWNED.match(name):  # the names first: the temporary directory may hold thousands of others
            continue
        path = os.path.join(parent, name)
        try:
            ours = os.stat(path).st_uid == os.getuid()
        except OSError:
            continue
        if ours and dead_owner(name) and remove(path):
            gone.append(path)
    return gone


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except OSError:  # not empty, or removed by another pool just now
        return False


def remove_dead(tmp: str | None = None, cgroups: str | None = None) -> list[str]:
    """Remove the working directories in ``tmp`` (default: the temporary directory) and the pids cgroups in
    ``cgroups`` (default: this process's pids hierarchy) whose owner is dead (module docstring); return them."""
    tmp = tempfile.gettempdir() if tmp is None else tmp
    if cgroups is None:
        try:
            cgroups = isolation.pids_hierarchy()
        except OSError:
            cgroups = None
    return (_remove_dead_in(tmp, _rmdir)
            + _remove_dead_in(cgroups, lambda path: os.path.isdir(path) and isolation.remove_cgroup(path)))
