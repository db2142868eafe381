"""The read allowlist of a run, enforced by Landlock (Linux 5.13+, unprivileged, in both namespace modes).

A run may open for reading only what lies beneath the directories of its Python installation that it
needs (the standard library and the site-packages that hold the preloaded modules), its own empty
working directory, a few character devices (/dev/null, /dev/zero, /dev/random, /dev/urandom) and its
own /proc/<pid>. Nothing else: not the trainer's working directory, out-dir, data or repository, not a
PYTHONPATH entry the installation does not need, not a world-readable file elsewhere, not another
process's /proc entry (command line, environment). Landlock checks the file actually opened, whatever the
route (a path, /proc/self/fd/N/.., openat on an inherited descriptor, /proc/<pid>/root), and it also
refuses every write, create, remove, rename and truncate (the seccomp policy refuses those already).

The server opens each allowed path once (O_PATH, ``Allowlist.open``; runs inherit those descriptors,
and import through the installation's ones, sandbox/isolation.py); each child, after fork, builds
its own ruleset from those descriptors plus its own /proc/<pid> (which no earlier child could name)
and restricts itself (``Allowlist.restrict``): a dozen system calls, off a run's latency because spares
are confined ahead of time. Where the kernel has no Landlock, ``abi()`` is 0 and runs read what their
uid may read (docs/sandbox.md says what that means).
"""
import ctypes
import os
import struct
import sys
from dataclasses import dataclass

CREATE_RULESET, ADD_RULE, RESTRICT_SELF = 444, 445, 446  # the same numbers on x86_64 and aarch64
CREATE_RULESET_VERSION, RULE_PATH_BENEATH = 1, 1
EXECUTE, READ_FILE, READ_DIR = 1 << 0, 1 << 2, 1 << 3  # (1 << 1 is WRITE_FILE: handled, never allowed)
REFER, TRUNCATE = 1 << 13, 1 << 14  # ABI 2, ABI 3
READ_TREE = EXECUTE | READ_FILE | READ_DIR
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(nr: int, *args) -> int:
    ret = _libc.syscall(nr, *args)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"landlock syscall {nr} failed: {os.strerror(e)}")
    return ret


def abi() -> int:
    """The Landlock ABI version this kernel offers, 0 where it has none (or it is disabled)."""
    ret = _libc.syscall(CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(ret, 0)


def handled(version: int) -> int:
    """Every filesystem access right of ABI ``version`` (the ones up to truncate): all are refused unless a
    rule allows them."""
    return ((1 << 13) - 1) | (REFER if version >= 2 else 0) | (TRUNCATE if version >= 3 else 0)


def installation_roots(exclude: tuple[str, ...]) -> list[str]:
    """The sys.path entries that hold a loaded module (the standard library, the site-packages of the preloaded
    modules) other than the packages named in ``exclude`` (the sandbox's own, which may live in a repository)."""
    entries = sorted({os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)}, key=len, reverse=True)
    used = set()
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and name.split(".")[0] not in exclude:
            used.add(next((e for e in entries if os.path.abspath(file).startswith(e + os.sep)), None))
    return sorted(used - {None})


@dataclass
class Allowlist:
    """What every run may read: directories (read, list, map as code) and single files, by O_PATH descriptor."""
    version: int
    trees: tuple = ()   # descriptors of directories a run may read beneath
    files: tuple = ()   # descriptors of files a run may read

    @classmethod
    def open(cls, roots: tuple[int, ...], workdir: str) -> "Allowlist":
        """In the server: ``roots`` (O_PATH descriptors of the installation's directories, which the runs inherit
        for their imports), the working directory and the devices; only ``roots`` where there is no Landlock."""
        version = abi()
        if not version:
            return cls(0, roots)
        flags = os.O_PATH | os.O_CLOEXEC
        files = tuple(os.open(path, flags) for path in DEVICES if os.path.exists(path))
        return cls(version, (*roots, os.open(workdir, flags | os.O_DIRECTORY)), files)

    def __post_init__(self):
        """The syscalls' arguments, built once in the server: a child only fills in its own /proc/<pid>."""
        self._attr = ctypes.create_string_buffer(struct.pack("<Q", handled(self.version)))
        self._rules = [ctypes.create_string_buffer(struct.pack("<Qi", access, fd))
                       for fds, access in ((self.trees, READ_TREE), (self.files, READ_FILE)) for fd in fds]
        self._own = ctypes.create_string_buffer(12)

    @property
    def fds(self) -> tuple:
        return self.trees + self.files

    def restrict(self) -> None:
        """In a just-forked child: allow the allowlist and this process's own /proc/<pid>, refuse the rest of the
        filesystem, for good. Sets no_new_privs (Landlock needs it from an unprivileged process)."""
        if not self.version:
            return
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        # /proc/self, not /proc/<getpid()>: where /proc belongs to an outer pid namespace, only /proc/self
        # names this process
        own = os.open("/proc/self", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        struct.pack_into("<Qi", self._own, 0, READ_FILE | READ_DIR, own)
        ruleset = _syscall(CREATE_RULESET, self._attr, 8, 0)
        try:
            for rule in (*self._rules, self._own):
                _syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0)
            _syscall(RESTRICT_SELF, ruleset, 0)
        finally:
            os.close(ruleset)
            os.close(own)
