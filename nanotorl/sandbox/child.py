"""The life of one run: what a freshly forked child does before and while it runs untrusted code.

Order matters. Everything that needs a privileged or soon-forbidden syscall happens first, the
seccomp program is installed last, and only then does the untrusted code start:

    own process group      -> the server can SIGKILL the whole run on wall-time expiry
    parent-death signal    -> the run dies with the server, never lingers as an orphan
    signal mask            -> empty, as in a fresh ``python -c`` (the server blocks the signals that would stop it)
    stdio = /dev/null, /dev/null, the server's stderr (for a failure to confine); every other fd closed
        but its channel to the server and the allowlist's descriptors (the import directories, isolation.py)
    read-only empty working directory; its own pids cgroup if any
    setrlimit: CPU seconds, address space, file size 0, 64 descriptors, no core dumps, and (as its
        own uid) a cap on its tasks, threads included
    identity: no supplementary groups, then gid and uid of its slot (an unprivileged uid no one else
        uses); every capability is gone with uid 0, and dropped again for good measure
    every pseudo-random generator the server holds (random's, numpy's, sympy's...) reseeded from os.urandom
    -- the child is now a spare: it waits on its channel until the server passes it a run's descriptors --
    the run's descriptors: the code memfd and the stdout and stderr pipes the pool reads (fds 1 and 2)
    Landlock, with the ruleset the server built for this child: from now on it reads only the
        installation, its working directory and its own /proc/<pid> (sandbox/landlock.py; nothing
        changes where the kernel has no Landlock)
    the RUN seccomp program, on top of the SERVER one inherited at fork (sandbox/policy.py); it sets
        no_new_privs
    one byte STARTED on the channel, which it then closes (a child that dies before STARTED never ran
        its code, and the server gives the run to another child); the code, read from the memfd
    exec(code) in a fresh __main__, then os._exit: no interpreter teardown, no atexit of the server

The code and the output go from the pool to the child and back without passing through the server,
so no later run, forked from the server, can find them in its memory.
"""
import _random
import builtins
import contextlib
import ctypes
import gc
import math
import os
import platform
import random
import resource
import signal
import socket
import struct
import sys
import types
from dataclasses import dataclass

from nanotorl.sandbox.isolation import RUN_UIDS
from nanotorl.sandbox.landlock import Allowlist, restrict_self
from nanotorl.sandbox.syscalls import NUMBERS

FILENAME = "<code>"
STARTED = b"\x02"  # written on the channel once the run's descriptors have arrived, before its code runs
RIGHTS_SPACE = socket.CMSG_SPACE(4 * 4)  # room for the run's three descriptors and its Landlock ruleset
PR_SET_PDEATHSIG = 1
PR_GET_TID_ADDRESS = 40
LINUX_CAPABILITY_VERSION_3 = 0x20080522
OPEN_FILES = 64
MAX_FD = os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") > 0 else 1 << 20
# what the server blocks (it must outlive any signal that reaches it); a run unblocks them
SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS,
               signal.SIGABRT}
KEPT = SYNCHRONOUS | {signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE,
                      signal.SIGXFSZ, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH}
SERVER_BLOCKS = sorted(s for s in signal.valid_signals() if s not in KEPT)

# The first run of every server checks its own confinement: one SERVER rule, one RUN rule, its identity, and
# (READS, where the kernel has Landlock) the read allowlist.
PROBE = """import os, socket
for name, call in (("socket", socket.socket), ("setpgid", lambda: os.setpgid(0, 0))):
    try:
        call()
        raise SystemExit(f"{name}() was allowed: a seccomp filter is not active")
    except PermissionError:
        pass
try:
    os.listdir("/")
    if READS:
        raise SystemExit("listing / was allowed: the Landlock read allowlist is not active")
except PermissionError:
    pass
ids = os.getresuid() + os.getresgid()
if not (IDENTITY):
    raise SystemExit(f"the run has uids and gids {ids} and groups {os.getgroups()}, expected IDENTITY")
"""
OWN_ID = f"len(set(ids)) == 1 and ids[0] in {RUN_UIDS!r} and not os.getgroups()"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
             "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

_libc = ctypes.CDLL(None, use_errno=True)
prctl, capset, sigprocmask = _libc.prctl, _libc.capset, _libc.sigprocmask  # resolved once, in the server
_fork = ctypes.PyDLL(None, use_errno=True).fork  # PyDLL: called with the GIL held, so the child holds it too
_clone = ctypes.PyDLL(None, use_errno=True).syscall  # the raw syscall, as a PyDLL too
_clone.argtypes, _clone.restype = [ctypes.c_long] * 6, ctypes.c_long
_MACHINE = platform.machine()
# clone(2) as a sibling: the child's parent is the caller's parent; its tid is written where glibc keeps it
CLONE_PARENT, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x8000, 0x200000, 0x1000000
SIBLING = CLONE_PARENT | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | signal.SIGCHLD
prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_CAP_HEADER = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)  # {version, pid 0 = self}
_CAP_DATA = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable} words, all zero
_NO_SIGNALS = (ctypes.c_ulong * (1024 // (8 * ctypes.sizeof(ctypes.c_ulong))))()  # glibc's sigset_t, empty


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what} failed: {os.strerror(e)}")


def block_stopping_signals() -> None:
    """In the server: block every signal that would end or stop it, but SIGTERM and the faults it may
    cause itself (SIGKILL and SIGSTOP cannot be blocked; no run can send them). Blocked, not ignored:
    a forked child starts with no pending signal, so one sigprocmask gives a run back a fresh mask."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_BLOCKS)


def drop_capabilities() -> None:
    """capset(effective = permitted = inheritable = 0)."""
    _check(capset(_CAP_HEADER, _CAP_DATA), "capset")


def fork() -> int:
    """fork(2) from the single-threaded server, without CPython's at-fork work (``os.fork``'s): 0 in the child,
    the child's pid in the parent.

    ``os.fork`` re-initialises the runtime's locks and threads and runs every ``os.register_at_fork`` hook
    (threading's, logging's, random's) in the child, and more hooks in the parent: ~100 more pages written
    per run, each one a copy-on-write fault. A process with one thread, which holds no lock but the GIL
    (held across this call, so the child holds it too), has nothing for them to repair; glibc's own fork
    handlers (malloc's locks) still run, and ``confine`` reseeds every random generator, which random's hook
    would have done. Only for a server that has one thread (``single_threaded``) and whose preload modules and
    warm-up registered no hook of their own (``noting_at_fork_hooks``): the hooks it skips are then those of
    the standard library modules the server itself imports."""
    pid = _fork()
    if pid < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"fork failed: {os.strerror(e)}")
    return pid


def tid_address() -> int | None:
    """Where glibc keeps the main thread's tid (its ``struct pthread``'s ``tid``), from the main thread; None
    where the kernel cannot say (PR_GET_TID_ADDRESS needs CONFIG_CHECKPOINT_RESTORE), ``fork_sibling`` does
    not know the machine, or the address does not hold our tid, the pid (a C library other than glibc).
    glibc hands that address to the kernel as the thread's clear_child_tid, at start-up and in every fork,
    which is what the kernel returns here."""
    address = ctypes.c_ulong()
    if _MACHINE not in ("x86_64", "aarch64") or prctl(PR_GET_TID_ADDRESS, ctypes.addressof(address), 0, 0, 0) != 0:
        return None
    if not address.value or ctypes.c_int.from_address(address.value).value != os.getpid():
        return None
    return address.value


def fork_sibling(tid_at: int) -> int:
    """Like ``fork``, but the child is a child of this process's parent (CLONE_PARENT): 0 in the child, its pid
    here. For the server's template (spawn.py), whose runs must be the server's own children; ``tid_at`` is
    ``tid_address()``, taken in this process.

    A raw clone skips what glibc's fork does around its own clone; none of it is needed by a process with one
    thread that is not inside the C library when it forks (the template, which calls this from Python):
    the pthread_atfork handlers and glibc's lock resets make locks and thread pools that other threads held
    consistent in the child, and there are no other threads (as for ``fork``, the caller holds only the GIL,
    which the child inherits held). What glibc's fork does that a run can see is done here as it does it:
    the child's tid is written into its ``struct pthread`` (CLONE_CHILD_SETTID; without it glibc would keep
    the template's tid there, and ``pthread_getcpuclockid``, ``pthread_kill`` and mutex owners would name
    a thread of another process) and cleared at exit (CLONE_CHILD_CLEARTID). Left out: re-registering the
    main thread's robust-mutex list (set_robust_list; the kernel forgets it at fork), which only matters to
    robust mutexes, which Python does not use. The exit signal is SIGCHLD either way: with CLONE_PARENT the
    kernel gives the child this process's own, which the server's fork made SIGCHLD."""
    if _MACHINE == "x86_64":  # clone(flags, stack (0: a copy of ours), parent_tid, child_tid, tls)
        pid = _clone(NUMBERS["clone"][0], SIBLING, 0, 0, tid_at, 0)
    else:  # aarch64: clone(flags, stack, parent_tid, tls, child_tid)
        pid = _clone(NUMBERS["clone"][1], SIBLING, 0, 0, 0, tid_at)
    if pid < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"clone failed: {os.strerror(e)}")
    return pid


@contextlib.contextmanager
def noting_at_fork_hooks(hooks: list):
    """Within: append to ``hooks`` every ``os.register_at_fork`` call's hooks (and register them). The server
    notes the preload modules' own: ``fork`` would not run them, so where there are any it keeps ``os.fork``."""
    register = os.register_at_fork

    def note(**kwargs):
        hooks.append(kwargs)
        register(**kwargs)

    os.register_at_fork = note
    try:
        yield
    finally:
        os.register_at_fork = register


def single_threaded() -> bool:
    """Whether this process has exactly one thread (then ``fork`` is safe)."""
    return len(os.listdir("/proc/self/task")) == 1


def vm_bytes() -> int:
    """Current address-space size of this process (VmSize)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def resource_limits(cpu_time: float, address_space: int, tasks: int | None) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) for every run, never above what the server itself may use. ``tasks`` caps
    the processes and threads of the run's uid (None: the run keeps the server's uid, where the count
    would include the trainer's own threads, so only a pids cgroup can cap them)."""
    cpu = math.ceil(cpu_time)
    wanted = [(resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
              (resource.RLIMIT_AS, address_space, address_space),
              (resource.RLIMIT_FSIZE, 0, 0),
              (resource.RLIMIT_NOFILE, OPEN_FILES, OPEN_FILES),
              (resource.RLIMIT_CORE, 0, 0)]
    if tasks is not None:
        wanted.append((resource.RLIMIT_NPROC, tasks, tasks))
    limits = []
    for res, soft, hard in wanted:
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY:
            soft, hard = min(soft, cap), min(hard, cap)
        limits.append((res, (soft, hard)))
    return limits


def generators() -> list:
    """Every pseudo-random generator object in this process: random.Random instances (the module's own,
    sympy's, any library's) and numpy's RandomState / Generator. Called once in the server."""
    kinds = [random.Random]
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        kinds += [numpy_random.RandomState, numpy_random.Generator]
    return [g for g in gc.get_objects() if isinstance(g, tuple(kinds)) and not isinstance(g, random.SystemRandom)]


def reseed(gens: list) -> None:
    """Give every generator fresh state from os.urandom, so no two runs share a random sequence."""
    for g in gens:
        if type(g) is random.Random:  # the C seed(): all 624 words of state from the OS, as Random() does; half
            _random.Random.seed(g)  # the pages and time of random.Random.seed(bytes) (its sha512), in every run
            g.gauss_next = None  # as random.Random.seed does
        elif isinstance(g, random.Random):  # a subclass: its own seed(), which may keep more state
            g.seed(os.urandom(32))
        elif hasattr(g, "bit_generator"):  # numpy Generator: a new bit generator of the same kind
            g.bit_generator.state = type(g.bit_generator)(int.from_bytes(os.urandom(16), "little")).state
        else:  # numpy RandomState
            g.seed([int.from_bytes(os.urandom(4), "little") for _ in range(8)])


@dataclass
class Confinement:
    """What the server decided once for every run; ``confine`` applies it in each child."""
    workdir: str
    limits: list                 # from resource_limits
    seccomp: object              # the RUN policy.Filter, or None when allowed to run unconfined
    allowlist: Allowlist         # what a run may read (sandbox/landlock.py); its descriptors stay open in every run
    cgroup: str | None = None    # a pids cgroup directory that holds one subdirectory per slot
    switch_uid: bool = False     # whether the server may give runs an identity of their own
    generators: tuple = ()


def close_all_but(keep) -> None:
    """Close every descriptor above stdio (fds 0-2) but those in ``keep``."""
    keep = sorted({fd for fd in keep if fd > 2})
    for lo, hi in zip([3] + [fd + 1 for fd in keep], keep + [MAX_FD]):
        os.closerange(lo, hi)


def confine(stdio: tuple[int, int, int], channel: int, server_pid: int, cfg: Confinement, uid: int,
            slot: int) -> None:
    """Confine this just-forked child but for the RUN seccomp program (``receive`` installs it); raise if any
    step fails (the caller then exits, never runs code).

    ``stdio``: descriptors for fds 0, 1, 2 until the run's arrive. ``channel``: the socket they arrive on.
    ``uid``: the run's own uid (and gid), used when ``cfg.switch_uid``; ``slot``: its pids cgroup, when
    ``cfg.cgroup``."""
    os.setpgid(0, 0)
    _check(prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != server_pid:  # the server died between fork and prctl
        os._exit(1)
    # libc, not signal.pthread_sigmask: that returns the old mask as a set of Signals members, whose enum
    # look-ups touch (and copy) ~60 pages in a fresh child, 0.2 CPU-ms per run
    _check(sigprocmask(signal.SIG_SETMASK, _NO_SIGNALS, None), "sigprocmask")
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    close_all_but((*cfg.allowlist.fds, channel))
    os.chdir(cfg.workdir)
    if cfg.cgroup:  # os.open, not open(): no io objects to build in a fresh child (~0.2 CPU-ms per run)
        procs = os.open(os.path.join(cfg.cgroup, str(slot), "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(procs, b"0")
        finally:
            os.close(procs)
    for res, soft_hard in cfg.limits:
        resource.setrlimit(res, soft_hard)
    if cfg.switch_uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    drop_capabilities()
    reseed(cfg.generators)


def receive(channel: socket.socket, cfg: Confinement) -> str:
    """Wait for the run: its code memfd and the write ends of its stdout and stderr, from the pool by way of the
    server, and (with Landlock) this child's ruleset, with which it restricts itself. Make them fds 1 and 2
    (stdin stays /dev/null: input() meets EOF, as with no stdin at all), install
    the RUN seccomp program, say STARTED on the channel and close it, then read the code and return it."""
    # recvmsg, not socket.recv_fds: that imports the array module, in every child
    _, ancillary, _, _ = channel.recvmsg(16, RIGHTS_SPACE)
    if not ancillary:  # the server is gone
        os._exit(1)
    fds = struct.unpack(f"{len(ancillary[0][2]) // 4}i", ancillary[0][2])
    if len(fds) != 3 + bool(cfg.allowlist.version):
        raise OSError(f"expected the run's 3 descriptors and a Landlock ruleset where there is Landlock, got {fds}")
    if cfg.allowlist.version:
        restrict_self(fds[3])
    code_fd, out_w, err_w = fds[:3]
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.close(out_w)
    os.close(err_w)
    if cfg.seccomp is not None:
        cfg.seccomp.install(os.getpid())
    os.write(channel.fileno(), STARTED)
    channel.close()
    size, chunks, got = os.fstat(code_fd).st_size, [], 0
    while got < size:  # pread, not read: a child before us that died reading it moved no offset
        chunks.append(os.pread(code_fd, size - got, got))
        got += len(chunks[-1]) or size
    os.close(code_fd)
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
