"""The seccomp policy of the sandbox: one allowlist, compiled to BPF by sandbox/bpf.py.

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
"""
import errno
from dataclasses import dataclass

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
    ("kill",                                                                   When(Arg(0, one_of=(SELF, 0, NEG_SELF))), ALLOW),
    ("tgkill rt_sigqueueinfo rt_tgsigqueueinfo",                               ITSELF,        ALLOW),
    # facts about itself and the machine
    ("getpid getppid getuid geteuid getgid getegid getresuid getresgid getgroups getpgrp getpgid getsid "
     "uname sysinfo getrlimit getrusage getpriority getrandom getcpu capget sched_getparam "
     "sched_getscheduler sched_get_priority_max sched_get_priority_min",      ALLOW,         ALLOW),
    ("prlimit64",                                                              GETRLIMIT,     ALLOW),
    ("prctl",                                                                  PRCTL,         ALLOW),
    # the server only: fork runs, confine them (group, limits, identity), watch and end them, talk to the pool
    ("setpgid setrlimit capset setgroups setresuid setresgid wait4 waitid pidfd_open pidfd_send_signal "
     "sendto recvfrom",                                                        NEVER,         ALLOW),
    # refused to both, like every call not in this table; named here because they are what an attack reaches for
    ("fork vfork execve execveat socket socketpair ptrace process_vm_readv process_vm_writev pidfd_getfd tkill "
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
