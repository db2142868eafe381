"""The life of one run: what a freshly forked child does before and while it runs untrusted code.

Order matters. Everything that needs a privileged or soon-forbidden syscall happens first, the
seccomp program is installed last, and only then does the untrusted code start:

    own process group      -> the server can SIGKILL the whole run on wall-time expiry
    parent-death signal    -> the run dies with the server, never lingers as an orphan
    stdio = the pipe the code arrives on (EOF once read) + two capped pipes; every other fd closed
    read-only empty working directory
    setrlimit: CPU seconds, address space, file size 0, 64 descriptors, no core dumps
    all capabilities dropped (matters when the trainer runs as root)
    the RUN seccomp program, on top of the SERVER one inherited at fork (sandbox/policy.py)
    -- the child is now a spare: it waits here until the server writes its code to stdin --
    exec(code) in a fresh __main__, then os._exit: no interpreter teardown, no atexit of the server
"""
import builtins
import ctypes
import math
import os
import resource
import signal
import sys
import types

FILENAME = "<code>"
PR_SET_PDEATHSIG = 1
LINUX_CAPABILITY_VERSION_3 = 0x20080522
OPEN_FILES = 64
MAX_FD = os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
prctl, capset = _libc.prctl, _libc.capset  # resolved once in the server, not in every child
prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_CAP_HEADER = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # {version, pid 0 = self}
_CAP_DATA = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what} failed: {os.strerror(e)}")


def drop_capabilities() -> None:
    """capset(effective = permitted = inheritable = 0): a root child keeps uid 0 but loses every privilege."""
    _check(capset(_CAP_HEADER, _CAP_DATA), "capset")


def resource_limits(cpu_time: float, address_space: int) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) for every run, never above what the server itself may use."""
    cpu = math.ceil(cpu_time)
    limits = []
    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
                            (resource.RLIMIT_AS, address_space, address_space),
                            (resource.RLIMIT_FSIZE, 0, 0),
                            (resource.RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
                            (resource.RLIMIT_CORE, 0, 0)):
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        limits.append((res, (soft, hard)))
    return limits


def confine(stdio: tuple[int, int, int], server_pid: int, workdir: str, limits: list, seccomp) -> None:
    """Confine this just-forked child; raise if any step fails (the caller then exits, never runs code).

    ``stdio``: descriptors for fds 0, 1, 2. ``limits``: from ``resource_limits``. ``seccomp``: the
    RUN ``policy.Filter``, or None when the pool was explicitly allowed to run unconfined.
    """
    os.setpgid(0, 0)
    _check(prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != server_pid:  # the server died between fork and prctl
        os._exit(1)
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    os.closerange(3, MAX_FD)
    os.chdir(workdir)
    for res, soft_hard in limits:
        resource.setrlimit(res, soft_hard)
    drop_capabilities()
    if seccomp is not None:
        seccomp.install(os.getpid())


def read_code() -> str:
    """The run's code: everything the server writes to stdin before closing it (so input() then
    meets EOF, as with no stdin at all)."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "surrogatepass")


def _exit_status(e: SystemExit) -> int:
    """What ``python -c`` returns for ``sys.exit(e.code)``."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def execute(code: str) -> int:
    """Run ``code`` like ``python -c`` would, in a fresh ``__main__``; return the exit status.

    sys.stdin/stdout/stderr are the server's own stream objects, now bound to the run's fds 0-2
    (the server never writes to them, so their buffers are empty; PYTHONIOENCODING made them
    UTF-8 with backslashreplace)."""
    sys.argv = ["-c"]
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    try:
        exec(compile(code, FILENAME, "exec"), main.__dict__)
        status = 0
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException as e:  # the child reports everything, like the interpreter would
        e.__traceback__ = e.__traceback__.tb_next  # hide this frame
        sys.__excepthook__(type(e), e, e.__traceback__)  # the interpreter's own report
        status = 1
    for stream in (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the code closed or replaced its streams: nothing more to deliver
            pass
    return status
