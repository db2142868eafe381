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
and import through the installation's ones, sandbox/isolation.py). After each fork it builds that
child's ruleset from those descriptors plus the child's own /proc/<pid> (which no earlier child could
name; ``Allowlist.ruleset``), and passes it with the run's descriptors; the child restricts itself
with it before its code runs (``restrict_self``: two system calls, and no Python work to speak of in
the child, where every object touched is a copy-on-write fault). Where the kernel has no Landlock,
``abi()`` is 0 and runs read what their uid may read (docs/sandbox.md says what that means).
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
        """The syscalls' arguments, built once."""
        self._attr = ctypes.create_string_buffer(struct.pack("<Q", handled(self.version)))
        self._rules = [ctypes.create_string_buffer(struct.pack("<Qi", access, fd))
                       for fds, access in ((self.trees, READ_TREE), (self.files, READ_FILE)) for fd in fds]

    @property
    def fds(self) -> tuple:
        return self.trees + self.files

    def ruleset(self, pid: int | None) -> int:
        """In the server, for the child ``pid``: a ruleset of the allowlist and that child's own /proc/<pid>
        (None: the server's /proc shows another pid namespace, so the child gets no /proc at all). The child
        restricts itself with it (``restrict_self``); -1 where there is no Landlock."""
        if not self.version:
            return -1
        ruleset = _syscall(CREATE_RULESET, self._attr, 8, 0)
        try:
            for rule in self._rules:
                _syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0)
            if pid is not None:
                own = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    rule = ctypes.create_string_buffer(struct.pack("<Qi", READ_FILE | READ_DIR, own))
                    _syscall(ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0)
                finally:
                    os.close(own)
        except OSError:
            os.close(ruleset)
            raise
        return ruleset


def restrict_self(ruleset: int) -> None:
    """In a child: refuse the filesystem but what ``ruleset`` allows, for good, and close it. Sets no_new_privs
    (Landlock needs it from an unprivileged process)."""
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    _syscall(RESTRICT_SELF, ruleset, 0)
    os.close(ruleset)
