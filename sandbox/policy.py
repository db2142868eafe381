"""The seccomp policy of the sandbox: one table, compiled to classic-BPF programs with ctypes.

Why ctypes and not libseccomp: the programs are a few hundred BPF instructions that this file
builds and that tests/test_sandbox.py reads back with a 20-line interpreter; libseccomp would add a
C library (and a Python binding PyPI does not ship as a wheel) to every training machine, for no
gain in what the filter can express. The price is the syscall-number table below for the two
architectures we support, which a test checks against libseccomp's own table where it is installed.

Each program (``seccomp_data`` = {int nr; u32 arch; u64 ip; u64 args[6]}, little endian):

    A = arch;  A != native arch          -> KILL_PROCESS   (no i386 / arm32 entry into the kernel)
    A = nr;    A >= 0x40000000 (x86_64)  -> KILL_PROCESS   (no x32 ABI)
    for each row (syscalls, allowed_when, errno) of its scope:
        A in syscalls -> allowed_when(args) ? ALLOW : ERRNO(errno)
    ALLOW

Two programs, because the kernel's cost of installing one grows with its length (~1 us per
instruction, every run): the SERVER rows (~160 instructions) are installed once in the fork server,
after start-up and before it forks any run, and every run inherits them; the RUN rows (~75) are
installed by each run after fork, because the server itself needs those calls (fork, kill, pidfd,
setrlimit, prctl) or because they name the run's own pid. The kernel evaluates every filter in a
process's stack and the strictest answer wins, so a run is confined by both.

It is a deny list: Python, numpy and sympy make ~80 different syscalls and an allow list would
break on the first library upgrade, while everything that reaches outside the run is named here.
Denied calls fail with EPERM (Python raises PermissionError, and the model reads a clear message);
``clone3`` and ``openat2`` fail with ENOSYS because their flags sit in memory the filter cannot
read, and libc then falls back to ``clone`` / ``openat``, which the filter can check.

Filesystem policy: every open for writing fails, and so does every call that changes a name, a
mode, an owner, a time or an attribute. There is no writable scratch directory at all: a run's
working directory is an empty directory it can only read. This is the simplest rule that holds on
every kernel (Landlock needs 5.13+, a read-only mount namespace needs user namespaces), it cannot
fill a disk, and it leaves nothing behind for the next run.
"""
import ctypes
import errno
import platform
from dataclasses import dataclass

SELF = "self"  # stands for the run's own pid; filled in after fork by ``Filter.install(pid)``

CLONE_THREAD = 0x10000
WRITE_FLAGS = 0o1 | 0o2 | 0o100 | 0o1000  # O_WRONLY | O_RDWR | O_CREAT | O_TRUNC (same on both archs)
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # push keystrokes into a terminal / console control
PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME = 2, 3, 15, 16
PR_GET_SECCOMP, PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS, PR_SET_VMA = 21, 23, 39, 0x53564D41


@dataclass(frozen=True)
class Arg:
    """A condition on the low 32 bits of argument ``i`` (every argument we check is an int or flags),
    or on all 64 bits when ``null`` asks whether a pointer is NULL."""
    i: int
    has_bits: int = 0
    lacks_bits: int = 0
    one_of: tuple = ()
    none_of: tuple = ()
    null: bool = False


# The policy. Each row: syscalls, the one harmless use that stays allowed (None: never), the errno
# they fail with, and where the rule is installed: SERVER rules once in the fork server before it
# forks anything (every run inherits them at fork, at no cost per run); RUN rules by each run after
# fork, because the server needs those calls itself (fork, kill, pidfd, limits) or they name the
# run's own pid. A run is confined by both programs: the kernel applies every filter in the stack.
SERVER, RUN = "server", "run"
POLICY = [
    # no new processes and no new programs; threads are fine (numpy and sympy may start them)
    ("fork vfork execve execveat",                      None,                                   errno.EPERM,  RUN),
    ("clone",                                           Arg(0, has_bits=CLONE_THREAD),          errno.EPERM,  RUN),
    ("clone3",                                          None,                                   errno.ENOSYS, RUN),
    # no reaching into other processes: signals only to itself, no debugging, no scheduling
    ("kill",                                            Arg(0, one_of=(SELF, 0)),               errno.EPERM,  RUN),
    ("tgkill rt_sigqueueinfo rt_tgsigqueueinfo",        Arg(0, one_of=(SELF,)),                 errno.EPERM,  RUN),
    ("tkill pidfd_open pidfd_send_signal setpgid",      None,                                   errno.EPERM,  RUN),
    (("ptrace process_vm_readv process_vm_writev kcmp pidfd_getfd process_madvise process_mrelease "
      "migrate_pages move_pages setpriority ioprio_set sched_setscheduler sched_setparam sched_setattr "
      "sched_setaffinity"),                             None,                                   errno.EPERM,  SERVER),
    # no network (the server also runs in an empty network namespace where the kernel allows one)
    ("socket socketpair",                               None,                                   errno.EPERM,  SERVER),
    # a read-only filesystem
    ("open",                                            Arg(1, lacks_bits=WRITE_FLAGS),         errno.EPERM,  SERVER),
    ("openat",                                          Arg(2, lacks_bits=WRITE_FLAGS),         errno.EPERM,  SERVER),
    ("openat2",                                         None,                                   errno.ENOSYS, SERVER),
    (("creat open_by_handle_at rename renameat renameat2 mkdir mkdirat rmdir unlink unlinkat link linkat "
      "symlink symlinkat mknod mknodat chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat "
      "truncate ftruncate fallocate utime utimes futimesat utimensat setxattr lsetxattr fsetxattr "
      "setxattrat removexattr lremovexattr fremovexattr removexattrat file_setattr"), None,     errno.EPERM,  SERVER),
    # no memory shared with other processes, nothing that outlives the run or escapes its memory limit
    (("memfd_create memfd_secret shmget shmat shmctl msgget msgsnd msgrcv msgctl semget semop semctl "
      "semtimedop mq_open"),                            None,                                   errno.EPERM,  SERVER),
    # no mounts, no namespaces
    (("mount umount2 pivot_root chroot move_mount open_tree open_tree_attr fsopen fsconfig fsmount "
      "fspick mount_setattr unshare setns"),            None,                                   errno.EPERM,  SERVER),
    # hands off the kernel and the machine
    (("init_module finit_module delete_module kexec_load kexec_file_load reboot swapon swapoff acct "
      "quotactl quotactl_fd syslog sethostname setdomainname settimeofday clock_settime clock_adjtime "
      "adjtimex iopl ioperm modify_ldt vhangup lookup_dcookie uselib personality fanotify_init sync syncfs"),
                                                        None,                                   errno.EPERM,  SERVER),
    ("ioctl",                                           Arg(1, none_of=(TIOCSTI, TIOCLINUX)),   errno.EPERM,  SERVER),
    # the sandbox stays as it is: no filter changes, no limits raised, no kernel-side programs or rings
    ("prctl", Arg(0, one_of=(PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP,
                             PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS, PR_SET_VMA)),                errno.EPERM,  RUN),
    ("prlimit64",                                       Arg(2, null=True),                      errno.EPERM,  RUN),
    ("setrlimit capset",                                None,                                   errno.EPERM,  RUN),
    (("seccomp keyctl add_key request_key bpf perf_event_open userfaultfd io_uring_setup io_uring_enter "
      "io_uring_register"),                             None,                                   errno.EPERM,  SERVER),
]

# Syscall numbers (x86_64, aarch64); None where the architecture does not have the call.
# From the kernel's syscall tables; tests/test_sandbox.py checks them against libseccomp.
NUMBERS = {
    # processes and programs
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435), "execve": (59, 221),
    "execveat": (322, 281),
    # other processes
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "kcmp": (312, 272),
    "pidfd_open": (434, 434), "pidfd_getfd": (438, 438), "pidfd_send_signal": (424, 424),
    "process_madvise": (440, 440), "process_mrelease": (448, 448), "migrate_pages": (256, 238),
    "move_pages": (279, 239), "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240), "setpgid": (109, 154), "setpriority": (141, 140),
    "ioprio_set": (251, 30), "sched_setscheduler": (144, 119), "sched_setparam": (142, 118),
    "sched_setattr": (314, 274), "sched_setaffinity": (203, 122),
    # network
    "socket": (41, 198), "socketpair": (53, 199),
    # filesystem writes
    "open": (2, None), "openat": (257, 56), "creat": (85, None), "openat2": (437, 437),
    "open_by_handle_at": (304, 265), "rename": (82, None), "renameat": (264, 38), "renameat2": (316, 276),
    "mkdir": (83, None), "mkdirat": (258, 34), "rmdir": (84, None), "unlink": (87, None), "unlinkat": (263, 35),
    "link": (86, None), "linkat": (265, 37), "symlink": (88, None), "symlinkat": (266, 36), "mknod": (133, None),
    "mknodat": (259, 33), "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54), "truncate": (76, 45),
    "ftruncate": (77, 46), "fallocate": (285, 47), "utime": (132, None), "utimes": (235, None),
    "futimesat": (261, None), "utimensat": (280, 88), "setxattr": (188, 5), "lsetxattr": (189, 6),
    "fsetxattr": (190, 7), "setxattrat": (463, 463), "removexattr": (197, 14), "lremovexattr": (198, 15),
    "fremovexattr": (199, 16), "removexattrat": (466, 466), "file_setattr": (469, 469),
    # state that outlives the run
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "shmat": (30, 196),
    "shmctl": (31, 195), "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192), "mq_open": (240, 180),
    # mounts and namespaces
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51), "move_mount": (429, 429),
    "open_tree": (428, 428), "open_tree_attr": (467, 467), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442), "unshare": (272, 97),
    "setns": (308, 268),
    # the kernel and the machine
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443), "syslog": (103, 116),
    "sethostname": (170, 161), "setdomainname": (171, 162), "settimeofday": (164, 170), "clock_settime": (227, 112),
    "clock_adjtime": (305, 266), "adjtimex": (159, 171), "iopl": (172, None), "ioperm": (173, None),
    "modify_ldt": (154, None), "vhangup": (153, 58), "lookup_dcookie": (212, 18), "uselib": (134, None),
    "personality": (135, 92), "fanotify_init": (300, 262), "sync": (162, 81), "syncfs": (306, 267),
    "ioctl": (16, 29),
    # the sandbox itself
    "seccomp": (317, 277), "prctl": (157, 167), "capset": (126, 91), "keyctl": (250, 219), "add_key": (248, 217),
    "request_key": (249, 218), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "setrlimit": (160, 164), "prlimit64": (302, 261),
}

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
RET_KILL_PROCESS, RET_ERRNO, RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
LD_ABS, JEQ, JGE, JSET, JA, RET = 0x20, 0x15, 0x35, 0x45, 0x05, 0x06  # BPF_{LD|W|ABS, JMP|..|K, RET|K}
ARGS_OFFSET = 16  # offsetof(struct seccomp_data, args)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def _condition(arg: Arg) -> list:
    """Instructions that jump to "allow" when ``arg`` holds and to "deny" otherwise."""
    lo = ARGS_OFFSET + 8 * arg.i
    if arg.null:
        return [(LD_ABS, 0, 0, lo), (JEQ, 0, "deny", 0), (LD_ABS, 0, 0, lo + 4), (JEQ, "allow", "deny", 0)]
    if arg.has_bits:
        return [(LD_ABS, 0, 0, lo), (JSET, "allow", "deny", arg.has_bits)]
    if arg.lacks_bits:
        return [(LD_ABS, 0, 0, lo), (JSET, "deny", "allow", arg.lacks_bits)]
    if arg.one_of:
        return [(LD_ABS, 0, 0, lo)] + [(JEQ, "allow", 0, v) for v in arg.one_of] + [(JA, 0, 0, "deny")]
    return [(LD_ABS, 0, 0, lo)] + [(JEQ, "deny", 0, v) for v in arg.none_of] + [(JA, 0, 0, "allow")]


def _resolve(block: list) -> list:
    """Append RET ALLOW and turn the symbolic "allow"/"deny" targets into relative jumps.
    The block's last instruction before RET ALLOW is its RET ERRNO."""
    block = block + [(RET, 0, 0, RET_ALLOW)]
    target = {"deny": len(block) - 2, "allow": len(block) - 1}
    out = []
    for i, (code, jt, jf, k) in enumerate(block):
        jt, jf = (target[j] - i - 1 if j in target else j for j in (jt, jf))
        out.append((code, jt, jf, target[k] - i - 1 if code == JA else k))
    return out


def compile_policy(scope: str, arch: str) -> list:
    """The program of the ``scope`` (SERVER or RUN) rules for ``arch``, as (code, jt, jf, k) tuples;
    ``k`` may still be ``SELF``."""
    if arch not in AUDIT_ARCH:
        raise RuntimeError(f"seccomp policy: expected an x86_64 or aarch64 machine, found {arch!r}; "
                           "the sandbox has no syscall table for it")
    column = 0 if arch == "x86_64" else 1
    prog = [(LD_ABS, 0, 0, 4), (JEQ, 1, 0, AUDIT_ARCH[arch]), (RET, 0, 0, RET_KILL_PROCESS), (LD_ABS, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, X32_SYSCALL_BIT), (RET, 0, 0, RET_KILL_PROCESS)]
    for names, allowed_when, err in (row[:3] for row in POLICY if row[3] == scope):
        numbers = [NUMBERS[name][column] for name in names.split()]
        numbers = [nr for nr in numbers if nr is not None]  # a syscall the architecture lacks cannot be called
        block = _resolve((_condition(allowed_when) if allowed_when else []) + [(RET, 0, 0, RET_ERRNO | err)])
        # nr == any of the row's numbers -> the row's block; otherwise on to the next row
        prog += [(JEQ, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]
        prog += [(JA, 0, 0, len(block))] + block
    return prog + [(RET, 0, 0, RET_ALLOW)]


class Filter:
    """The ``scope`` half of the policy compiled for this machine, ready to be installed."""

    def __init__(self, scope: str, arch: str | None = None):
        insns = compile_policy(scope, arch or platform.machine())
        self.array = (SockFilter * len(insns))(*[(c, jt, jf, 0 if k == SELF else k) for c, jt, jf, k in insns])
        self.self_slots = [i for i, insn in enumerate(insns) if insn[3] == SELF]
        self.fprog = SockFprog(len(insns), self.array)
        self.prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in every child
        self.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def install(self, pid: int) -> None:
        """Confine the calling process (and every child it forks later) for good; ``pid`` is its pid.
        Raise OSError if the kernel refuses. Call it while the process has a single thread."""
        for i in self.self_slots:
            self.array[i].k = pid
        for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                     (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self.fprog), 0, 0)):
            if self.prctl(*args) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"prctl({args[0]}) failed: {errno.errorcode.get(e, e)}; this kernel cannot seccomp")
