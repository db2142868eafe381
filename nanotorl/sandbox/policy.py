"""The seccomp policy of the sandbox: one allowlist table, compiled to classic-BPF programs with ctypes.

A run may make the system calls the table below allows it, with the arguments it allows, and no
others: every call not in the table fails with EPERM (Python raises PermissionError, and the model
reads a clear message); ``clone3`` and ``openat2`` fail with ENOSYS instead, because their flags sit
in memory the filter cannot read, and libc then falls back to ``clone`` / ``openat``, which it can.
The list was derived by tracing what model-style programs call (tests/test_sandbox_corpus.py keeps
that corpus, runs it in the sandbox, and checks it against this table with strace); where the C
library has two spellings of one harmless call (``poll``/``ppoll``, ``stat``/``newfstatat``/
``statx``, ``dup2``/``dup3``...) both are allowed, so another libc version does not break runs.
The anchors were Docker's default profile and nsjail's kafel policies, both allowlists; this one
is much narrower, because a run only computes and prints.

What a run can do, by construction: compute, map memory, start threads, read files that its uid
may read (the filesystem is read-only for it: no call can create, write, rename, lock or change a
file), sleep, time itself, signal itself, and write to the two pipes it was given. What it cannot
do: start processes or programs, open sockets of any family, signal or trace any other process,
make the kernel signal one on its behalf (no F_SETOWN, F_SETSIG, O_ASYNC, FIOASYNC, F_NOTIFY,
F_SETLEASE, no message queues or POSIX timers, no pidfds, no parent-death signal), lock files,
change its limits, identity or filter, mount, or reach kernel interfaces (bpf, io_uring, keys, perf).

Two programs, one table. The kernel's cost of installing a program grows with its length (~1 us per
instruction, every run), so the SERVER program is installed once in the fork server before it forks
anything, and every run inherits it at fork, for free: it allows what a run may do and, besides,
what the server itself needs (the "server" column: fork, kill, wait, set a child's identity and
limits, talk to the pool). The RUN program, installed by each run after fork, is short: it takes
back from the run exactly what the server column added, and checks the arguments that name the
run's own pid (``SELF``, filled in after fork). The kernel evaluates every program in a process's
stack and the strictest answer wins, so a run gets exactly the "run" column: the allowlist holds
for runs by construction, whatever the server column says.

The compiler, at the end of this file, uses ctypes and not libseccomp: the programs are a few hundred
BPF instructions that tests/test_sandbox.py reads back with a 20-line interpreter; libseccomp would add
a C library (and a Python binding PyPI does not ship as a wheel) to every training machine, for no gain
in what the filter can express. The price is the syscall-number table (sandbox/syscalls.py), which a
test checks against libseccomp's own table where it is installed.

Each program (``seccomp_data`` = {int nr; u32 arch; u64 ip; u64 args[6]}, little endian):

    A = arch;  A != native arch          -> KILL_PROCESS   (no i386 / arm32 entry into the kernel)
    A = nr;    A >= 0x40000000 (x86_64)  -> KILL_PROCESS   (no x32 ABI)
    for each row (syscalls, rule) of the program:
        A in syscalls -> rule(args) ? ALLOW : ERRNO(row's errno)
    default: ERRNO(EPERM) for the SERVER program (an allowlist), ALLOW for the RUN program

A rule's alternatives compile to a chain of tests; a test that fails jumps to the next alternative,
the last one's failure to the row's ERRNO.
"""
import ctypes
import errno
import platform
from dataclasses import dataclass

from nanotorl.sandbox.syscalls import NUMBERS

SELF, NEG_SELF = "self", "-self"  # the run's own pid (its process group, as kill() spells it), set after fork


@dataclass(frozen=True)
class Arg:
    """A test of the low 32 bits of argument ``i`` (every argument tested is an int or flags; the kernel
    reads no more of them): it is one of ``one_of``, or ``(arg & mask) == value``; or, with ``null``,
    all 64 bits are 0 (a NULL pointer)."""
    i: int
    one_of: tuple = ()
    mask: int = 0
    value: int = 0
    null: bool = False


@dataclass(frozen=True)
class When:
    """Allowed when one of the alternatives holds; an alternative is an Arg or a tuple of Args that all hold."""
    alternatives: tuple

    def __init__(self, *alternatives):
        object.__setattr__(self, "alternatives", tuple(a if isinstance(a, tuple) else (a,) for a in alternatives))


ALLOW, NEVER = "allow", "never"
NOSYS = "nosys"  # refused with ENOSYS, so that libc falls back to an older call the filter can read

# -- the arguments that stay allowed ------------------------------------------------------------------
F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
O_ASYNC = 0o20000  # signal-driven I/O: the kernel would send SIGIO to the fd's owner
FCNTL = When(Arg(1, one_of=(F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_DUPFD_CLOEXEC)),  # no owner, signal, lease, lock
             (Arg(1, one_of=(F_SETFL,)), Arg(2, mask=O_ASYNC, value=0)))            # O_NONBLOCK yes, O_ASYNC no
TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = 0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451
IOCTL = When(Arg(1, one_of=(TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX)))  # isatty, sizes, flags
PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP = 2, 3, 15, 16, 21
PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS, PR_SET_VMA = 23, 39, 0x53564D41
PRCTL = When(Arg(0, one_of=(PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP,
                            PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS, PR_SET_VMA)))  # reads, and naming its threads
CLONE_VM, CLONE_SIGHAND, CLONE_PIDFD, CLONE_PTRACE, CLONE_VFORK = 0x100, 0x800, 0x1000, 0x2000, 0x4000
CLONE_PARENT, CLONE_THREAD, CLONE_NEWNS, CLONE_NEWCGROUP = 0x8000, 0x10000, 0x20000, 0x2000000
CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (0x4000000, 0x8000000, 0x10000000,
                                                                          0x20000000, 0x40000000)
THREAD = CLONE_THREAD | CLONE_VM | CLONE_SIGHAND
CLONE = When(Arg(0, mask=THREAD | CLONE_PIDFD | CLONE_PTRACE | CLONE_VFORK | CLONE_PARENT | CLONE_NEWNS
                 | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET,
                 value=THREAD))  # a thread of this process, nothing else
WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000 | O_ASYNC  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC (same on both archs)
ITSELF = When(Arg(0, one_of=(SELF,)))  # a thread group id that must be the run's own
OWN_GROUP = When(Arg(0, one_of=(SELF, 0, NEG_SELF)))  # kill(): itself, or its own process group
GETRLIMIT = When((Arg(0, one_of=(0, SELF)), Arg(2, null=True)))  # read its own limits, set none

# -- the table ----------------------------------------------------------------------------------------
# (syscalls, what a run may do, what the server may do). Frequent calls come first (the program tests
# rows in order). A run is held to its column; the server column adds what the server needs itself,
# and "never" there means "no more than a run".
POLICY = [
    # memory, and I/O on the descriptors the process holds (for a run: its pipes and what it opened)
    ("read write readv writev pread64 pwrite64 preadv pwritev preadv2 pwritev2 lseek close close_range",
                                                                               ALLOW,         ALLOW),
    ("brk mmap munmap mremap mprotect madvise mincore msync mbind",            ALLOW,         ALLOW),
    ("dup dup2 dup3 pipe pipe2 poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait "
     "epoll_pwait epoll_pwait2",                                               ALLOW,         ALLOW),
    ("fcntl",                                                                  FCNTL,         ALLOW),
    ("ioctl",                                                                  IOCTL,         NEVER),
    # reading the filesystem (what the uid may read); the run's filesystem is read-only
    ("open",                                                                   When(Arg(1, mask=WRITE_FLAGS)), ALLOW),
    ("openat",                                                                 When(Arg(2, mask=WRITE_FLAGS)), ALLOW),
    ("openat2",                                                                NOSYS,         NOSYS),
    ("stat fstat lstat newfstatat statx statfs fstatfs access faccessat faccessat2 readlink readlinkat "
     "getdents getdents64 getcwd chdir fchdir fadvise64 umask",                ALLOW,         ALLOW),
    # threads, futexes, the C library's own bookkeeping
    ("futex set_robust_list set_tid_address rseq gettid sched_yield sched_getaffinity arch_prctl exit "
     "exit_group restart_syscall",                                             ALLOW,         ALLOW),
    ("clone",                                                                  CLONE,         ALLOW),
    ("clone3",                                                                 NOSYS,         NOSYS),
    # time
    ("clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time times getitimer setitimer "
     "alarm pause",                                                            ALLOW,         ALLOW),
    # signals: its own handlers and masks; sent only to itself (the server cannot know a run's pid)
    ("rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigsuspend rt_sigtimedwait sigaltstack",
                                                                               ALLOW,         ALLOW),
    ("kill",                                                                   OWN_GROUP,     ALLOW),
    ("tgkill rt_sigqueueinfo rt_tgsigqueueinfo",                               ITSELF,        ALLOW),
    # facts about itself and the machine
    ("getpid getppid getuid geteuid getgid getegid getresuid getresgid getgroups getpgrp getpgid getsid "
     "uname sysinfo getrlimit getrusage getpriority getrandom getcpu capget sched_getparam "
     "sched_getscheduler sched_get_priority_max sched_get_priority_min",      ALLOW,         ALLOW),
    ("prlimit64",                                                              GETRLIMIT,     ALLOW),
    ("prctl",                                                                  PRCTL,         ALLOW),
    # the server only: fork runs, confine them (group, limits, identity, Landlock), hand them their descriptors,
    # watch and end them, talk to the pool
    ("setpgid setrlimit capset setgroups setresuid setresgid wait4 waitid pidfd_open pidfd_send_signal "
     "sendto recvfrom sendmsg recvmsg socketpair landlock_create_ruleset landlock_add_rule landlock_restrict_self",
                                                                               NEVER,         ALLOW),
    # refused to both, like every call not in this table; named here because they are what an attack reaches for
    ("fork vfork execve execveat socket ptrace process_vm_readv process_vm_writev pidfd_getfd tkill "
     "setsid flock timer_create mq_open mq_notify memfd_create unshare setns mount seccomp bpf io_uring_setup "
     "userfaultfd perf_event_open",                                            NEVER,         NEVER),
]
SERVER, RUN = "server", "run"
ERRNO = {NEVER: errno.EPERM, NOSYS: errno.ENOSYS}  # how a refused call fails


def combine(run, server):
    """What the SERVER program allows for a row: the server's needs and everything a run may do."""
    if ALLOW in (run, server):
        return ALLOW
    if isinstance(run, When) and isinstance(server, When):
        return When(*run.alternatives, *server.alternatives)
    return server if isinstance(server, When) else run


def rules(scope: str) -> list[tuple[str, object]]:
    """(syscalls, rule) rows of one program. SERVER: what the server or a run may do (default EPERM).
    RUN: the rows where a run may do less than the SERVER program allows (default ALLOW)."""
    out = []
    for names, run, server in POLICY:
        both = combine(run, server)
        if scope == SERVER and both != NEVER:
            out.append((names, both))
        elif scope == RUN and run != both:
            out.append((names, run))
    return out


def run_allows(name: str) -> bool:
    """Whether the table lets a run make syscall ``name`` at all (with some arguments)."""
    return any(run not in (NEVER, NOSYS) for names, run, _ in POLICY if name in names.split())


# -- the compiler -------------------------------------------------------------------------------------
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
LD_ABS, AND, JEQ, JGE, JA, RET = 0x20, 0x54, 0x15, 0x35, 0x05, 0x06  # BPF_{LD|W|ABS, ALU|AND|K, JMP|..|K, RET|K}
ARGS_OFFSET = 16  # offsetof(struct seccomp_data, args)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def _test(arg: Arg, ok: str, fail: str) -> list:
    """Instructions that go on at label ``ok`` when ``arg`` holds and jump to label ``fail`` otherwise."""
    lo = ARGS_OFFSET + 8 * arg.i
    if arg.null:
        test = [(LD_ABS, 0, 0, lo), (JEQ, 0, fail, 0), (LD_ABS, 0, 0, lo + 4), (JEQ, 0, fail, 0)]
    elif arg.one_of:
        *first, last = arg.one_of
        test = [(LD_ABS, 0, 0, lo)] + [(JEQ, ok, 0, v) for v in first] + [(JEQ, 0, fail, last)]
    else:
        test = [(LD_ABS, 0, 0, lo), (AND, 0, 0, arg.mask), (JEQ, 0, fail, arg.value)]
    return test + [("label", ok)]


def _rule_block(rule, err: int) -> list:
    """The instructions of one row's rule (with labels): RET ALLOW when it holds, else RET ERRNO(err)."""
    if rule == ALLOW:
        return [(RET, 0, 0, RET_ALLOW)]
    if not isinstance(rule, When):
        return [(RET, 0, 0, RET_ERRNO | err)]
    block = []
    for n, alternative in enumerate(rule.alternatives):
        fail = f"alternative {n + 1}" if n + 1 < len(rule.alternatives) else "deny"
        for i, arg in enumerate(alternative):
            block += _test(arg, f"holds {n}.{i}", fail)
        block += [(JA, 0, 0, "allow"), ("label", fail)]
    return block + [(RET, 0, 0, RET_ERRNO | err), ("label", "allow"), (RET, 0, 0, RET_ALLOW)]


def _resolve(block: list) -> list:
    """Drop the labels and turn jumps to them into relative offsets."""
    where, out = {}, []
    for insn in block:
        if insn[0] == "label":
            where[insn[1]] = len(out)
        else:
            out.append(insn)
    resolved = []
    for i, (code, jt, jf, k) in enumerate(out):
        jt, jf = (where[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        if code == JA and isinstance(k, str):
            k = where[k] - i - 1
        assert 0 <= jt < 256 and 0 <= jf < 256, "a row's rule is too long for an 8-bit jump"
        resolved.append((code, jt, jf, k))
    return resolved


def compile_policy(scope: str, arch: str) -> list:
    """The ``scope`` (SERVER or RUN) program for ``arch``, as (code, jt, jf, k) tuples; ``k`` may still
    be ``SELF`` or ``NEG_SELF`` in the RUN program."""
    if arch not in AUDIT_ARCH:
        raise RuntimeError(f"seccomp policy: expected an x86_64 or aarch64 machine, found {arch!r}; "
                           "the sandbox has no syscall table for it")
    column = 0 if arch == "x86_64" else 1
    prog = [(LD_ABS, 0, 0, 4), (JEQ, 1, 0, AUDIT_ARCH[arch]), (RET, 0, 0, RET_KILL_PROCESS), (LD_ABS, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, RET_KILL_PROCESS)]
    for names, rule in rules(scope):
        numbers = [NUMBERS[name][column] for name in names.split()]
        numbers = [nr for nr in numbers if nr is not None]  # a syscall the architecture lacks cannot be called
        block = _resolve(_rule_block(rule, ERRNO.get(rule, errno.EPERM)))
        if scope == SERVER and any(k in (SELF, NEG_SELF) for *_, k in block):
            raise ValueError(f"{names}: the SERVER program cannot test a run's own pid; allow it in the server column")
        # nr == any of the row's numbers -> the row's block; otherwise on to the next row
        prog += [(JEQ, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]
        prog += [(JA, 0, 0, len(block)), *block]
    default = RET_ERRNO | errno.EPERM if scope == SERVER else RET_ALLOW
    return prog + [(RET, 0, 0, default)]


class Filter:
    """The ``scope`` program of the policy compiled for this machine, ready to be installed."""

    def __init__(self, scope: str, arch: str | None = None):
        insns = compile_policy(scope, arch or platform.machine())
        self.array = (SockFilter * len(insns))(*[(c, jt, jf, 0 if isinstance(k, str) else k)
                                                  for c, jt, jf, k in insns])
        self.self_slots = [(i, k) for i, (*_, k) in enumerate(insns) if k in (SELF, NEG_SELF)]
        self.fprog = SockFprog(len(insns), self.array)
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in every child
        self.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def install(self, pid: int) -> None:
        """Confine the calling process (and every child it forks later) for good; ``pid`` is its pid.
        Raise OSError if the kernel refuses. Call it while the process has a single thread."""
        for i, k in self.self_slots:
            self.array[i].k = pid if k == SELF else -pid & 0xFFFFFFFF
        for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                     (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self.fprog), 0, 0)):
            if self.prctl(*args) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"prctl({args[0]}) failed: {errno.errorcode.get(e, e)}; this kernel cannot seccomp")

