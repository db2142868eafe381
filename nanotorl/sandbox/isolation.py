"""What the fork server sets up once, around all its runs: namespaces, identities, a pids cgroup, imports.

Namespaces (where the kernel allows them; detected, never assumed): fresh pid, mount, network and
IPC namespaces, plus a user namespace when the trainer is not root. Runs then see no process outside
the sandbox, have no network at all, and die with the server's pid-1 process.

Identities: when the server runs as root, every child gets a uid and gid of its own, taken from
RUN_UIDS by slot (a slot is freed when its child is reaped), with no supplementary groups. No one
else uses those ids, so a run can read only world-readable files, cannot signal or trace any other
process (the kernel checks uids before the filter is even asked), and RLIMIT_NPROC counts its own
tasks alone. A trainer that is not root cannot hand out other uids (an unprivileged user namespace
maps only one): runs then keep the trainer's uid, and the seccomp policy is what keeps them apart.

Huge pages for the server's memory, so that forking it is cheap (``use_huge_pages``).

A pids cgroup (where a writable cgroup v1 or v2 pids controller is available): one directory per
slot with ``pids.max``, a second cap on a run's tasks that holds whatever its uid.

Imports: an unprivileged uid may not be able to reach the Python installation (pyenv under /root is
common). The server opens the installation's directories on ``sys.path`` once (O_PATH: the standard
library and the site-packages of the preloaded modules, never the repository or other PYTHONPATH
entries; sandbox/landlock.py picks them) and points ``sys.path`` and every loaded package's
``__path__`` at ``/proc/self/fd/N``; the runs inherit those descriptors, so a run imports from the
installation by descriptor, without the right to search the directories above it. Landlock, where the
kernel has it, keeps the descriptors from reaching anything outside those directories.
"""
import ctypes
import os
import sys
import time

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 1 << 18
# The top 2^16 uids below 2^31: past systemd's container range (up to 1879048191) and OpenShift's project
# ranges (up to 1999999999), far above subuid ranges and real users, and still positive as a signed int.
RUN_UIDS = range(2**31 - 2**16, 2**31)
TASKS = 64  # processes and threads one run may have (the threads of numpy, sympy or the code itself)

MADV_COLLAPSE, HUGE_PAGE = 25, 2 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def enter_namespaces() -> list[str]:
    """unshare() into fresh pid, mount, network and IPC namespaces (plus a user namespace when not root).

    Returns the namespaces entered; [] where the kernel or a container forbids it."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | (CLONE_NEWUSER if uid else 0)) != 0:
        return []
    if uid:  # map our own ids into the user namespace, so files keep their owners
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    return ["user"] * bool(uid) + ["pid", "mount", "net", "ipc"]


def mount_fresh_proc() -> bool:
    """Make every mount private to this namespace, then mount a /proc that shows only our processes."""
    return (_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) == 0
            and _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0)


def use_huge_pages() -> None:
    """Back the server's anonymous memory with 2 MiB pages (MADV_COLLAPSE, Linux 6.1+; best effort).

    fork() copies, and each child's exit tears down, one page-table entry per 4 KiB page the server
    maps: ~14k entries with sympy loaded. Huge pages cut that 512-fold for the regions the forking
    process does not write to later (its own writes after a fork split a huge page back), which still
    saves ~0.5 of ~3 CPU-ms per run here (~20% throughput); the server's template (spawn.py), which
    writes little, keeps more of them whole. Where the kernel says no, nothing changes."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()  # address perms offset dev inode [path]
            if fields[1].startswith("rw") and (len(fields) == 5 or fields[5] == "[heap]"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if hi - lo >= HUGE_PAGE:
                    _libc.madvise(lo, hi - lo, MADV_COLLAPSE)


def run_uid(slot: int) -> int:
    if slot >= len(RUN_UIDS):
        raise ValueError(f"sandbox: {slot + 1} slots asked, only {len(RUN_UIDS)} run uids exist; use fewer workers")
    return RUN_UIDS[slot]


def share_import_roots(paths: list[str]) -> tuple[int, ...]:
    """Open the import directories ``paths`` (sandbox/landlock.py picks them) and point sys.path and every
    loaded package's __path__ at them through /proc/self/fd; drop every other sys.path entry (the
    repository, PYTHONPATH, the working directory). Return the descriptors."""
    roots = {os.path.abspath(p): os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for p in paths}
    longest_first = sorted(roots, key=len, reverse=True)

    def by_fd(path: str) -> str:
        full = os.path.abspath(path or ".")
        for root in longest_first:
            if full == root or full.startswith(root + os.sep):
                return f"/proc/self/fd/{roots[root]}{full[len(root):]}"
        return path

    sys.path[:] = [by_fd(p) for p in sys.path if by_fd(p) != p]
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = [by_fd(p) for p in path]
    sys.path_importer_cache.clear()
    return tuple(roots.values())


def pids_hierarchy() -> str | None:
    """This process's directory in the pids controller's hierarchy (cgroup v1 or v2), or None."""
    with open("/proc/self/cgroup") as f:
        memberships = [line.rstrip("\n").split(":", 2) for line in f]
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for _, controllers, path in memberships:
        v1 = "pids" in controllers.split(",")
        if not v1 and controllers:
            continue
        for m in mounts:
            fstype, options = m[m.index("-") + 1], m[-1].split(",")
            if (v1 and fstype == "cgroup" and "pids" in options) or (not v1 and fstype == "cgroup2"):
                root, mountpoint = m[3], m[4]
                rel = path[len(root):] if root != "/" and path.startswith(root) else path
                directory = mountpoint + rel.rstrip("/")
                if v1 or "pids" in open(os.path.join(directory, "cgroup.controllers")).read().split():
                    return directory
    return None


def make_pids_cgroup(name: str, slots: int, tasks: int) -> tuple[str | None, str | None]:
    """Create ``<pids hierarchy>/<name>/<slot>`` with ``pids.max = tasks`` for every slot.
    Returns (directory, None), or (None, why not) where no writable pids controller is available."""
    parent = None
    try:
        parent = pids_hierarchy()
        if parent is None:
            return None, "no pids controller is mounted"
        top = os.path.join(parent, name)
        os.mkdir(top)
        if os.path.exists(os.path.join(top, "cgroup.subtree_control")):  # v2: delegate pids to the slots
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+pids")
            with open(os.path.join(top, "cgroup.subtree_control"), "w") as f:
                f.write("+pids")
        for slot in range(slots):
            os.mkdir(os.path.join(top, str(slot)))
            with open(os.path.join(top, str(slot), "pids.max"), "w") as f:
                f.write(str(tasks))
        return top, None
    except OSError as e:
        if parent is not None:
            remove_cgroup(os.path.join(parent, name))
        return None, f"cannot create a pids cgroup ({e.strerror}: {e.filename})"


def pids_cgroup_path(name: str) -> str | None:
    """Where make_pids_cgroup(name, ...) puts its cgroup when called from a process in this one's cgroup."""
    try:
        parent = pids_hierarchy()
    except OSError:
        return None
    return None if parent is None else os.path.join(parent, name)


def remove_cgroup(top: str | None, wait: float = 0.0) -> bool:
    """Remove a cgroup made by make_pids_cgroup once its processes are gone, trying for up to ``wait``
    seconds (runs die a moment after their server); True if nothing is left."""
    deadline = time.monotonic() + wait
    while top and os.path.isdir(top):
        for entry in os.listdir(top):
            if entry.isdigit():
                try:
                    os.rmdir(os.path.join(top, entry))
                except OSError:
                    pass
        try:
            os.rmdir(top)
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
    return True
